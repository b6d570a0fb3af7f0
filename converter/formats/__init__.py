"""Checkpoint formats: readers and writers that know no model family (tensor names in, tensors
out); `reader.open_checkpoint` opens a Megatron checkpoint in whichever format it is."""
