"""`convert-checkpoint`: Megatron-Core <-> Hugging Face conversion of NVLM-D checkpoints."""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="nvlm-port")
def main() -> None:
    """Convert NVLM-D checkpoints between Megatron-Core (legacy `torch` and `torch_dist`, any TP/PP)
    and Hugging Face safetensors that load into the NVLM_D model class.

    The conversion commands (megatron-to-hf, hf-to-megatron, reshard, inspect, verify) are not
    implemented yet.
    """
