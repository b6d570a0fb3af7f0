"""`parity-check`: run the Megatron-Core model and the Hugging Face class on identical inputs."""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="nvlm-port")
def main() -> None:
    """Compare a Megatron-Core NVLM-D checkpoint with its Hugging Face conversion: logits layer by
    layer, greedy generations and benchmark scores.

    The comparison commands (logits, bench) are not implemented yet.
    """
