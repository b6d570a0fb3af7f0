"""Write a synthetic benchmark (five families drawn with PIL) in the JSONL `parity-check bench` reads.

    python scripts/make_synthetic_bench.py --seed 0 --n 100 tests/fixtures/synthetic-bench

`--n` items per family (ocr, chart, document, multiple-choice, vqa): OUT/bench.jsonl and
OUT/images/*.png. Deterministic: the same seed gives byte-identical files. The families, their
metrics and the split between evaluation and training items: scripts/synthetic_bench.py.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from synthetic_bench import write_bench  # noqa: E402 (beside this script)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--n", "per_family", type=int, default=100, show_default=True, help="Items per family.")
@click.option("--split", default="eval", show_default=True, help="Item stream (training uses 'train').")
@click.argument("out", type=click.Path(path_type=Path))
def main(seed: int, per_family: int, split: str, out: Path) -> None:
    files = write_bench(out, seed=seed, per_family=per_family, split=split)
    sizes = Counter()
    from PIL import Image

    for path in files.images:
        with Image.open(path) as image:
            sizes[image.size] += 1
    size_bytes = sum(p.stat().st_size for p in files.images) + files.jsonl.stat().st_size
    click.echo(
        f"wrote {files.jsonl} ({len(files.images)} items, {size_bytes / 1e6:.2f} MB); image sizes: "
        + ", ".join(f"{w}x{h}: {n}" for (w, h), n in sorted(sizes.items()))
    )


if __name__ == "__main__":
    main()
