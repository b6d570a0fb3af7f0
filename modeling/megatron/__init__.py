"""NVLM-D built with Megatron-Core (see docs/MEGATRON.md).

Importing this package does not import megatron-core; its submodules do, except `args`, which
the converter uses to read checkpoints without Megatron installed.
"""
