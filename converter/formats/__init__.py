"""Checkpoint formats: readers and writers that know nothing of NVLM (tensor names in, tensors out)."""
