"""The checks a Megatron checkpoint passes before megatron-core loads it for `parity-check`.

megatron-core's `dist_checkpointing.load` unpickles a torch_dist `.metadata` with plain
`pickle.load` and every DCP byte object (`_extra_state` shards, 0.19's `common_state`) with
`torch.load(weights_only=False)`: code in a crafted file would run. So parity-check first opens
the checkpoint with the converter's readers (every rank file, `common.pt` and `.metadata` through
converter/formats/safe_pickle.py, bounds and storage paths checked) and unpickles every byte
object the `.metadata` lists the same safe way. Only a checkpoint that passes reaches
megatron-core; `--trust-pickle` skips the allow-lists, as it does for the converter.
"""

from __future__ import annotations

from pathlib import Path

from torch.distributed.checkpoint.metadata import BytesStorageMetadata

from ..errors import ConversionError
from ..formats import safe_pickle


def open_checked(path: Path, *, trust_pickle: bool = False):
    """The checkpoint as the converter reads it (ConversionError naming the file otherwise), its
    torch_dist byte objects unpickled safely too."""
    from ..engine import open_megatron

    ckpt = open_megatron(Path(path), trust_pickle=trust_pickle)
    if ckpt.format == "torch_dist" and not trust_pickle:
        check_byte_objects(ckpt)
    return ckpt


def check_byte_objects(ckpt) -> int:
    """Unpickle every DCP byte object of a torch_dist checkpoint through the allow-list (a
    wrapped BytesIO's inner pickle too); return how many there were."""
    keys = {
        key
        for key, meta in ckpt.metadata.state_dict_metadata.items()
        if isinstance(meta, BytesStorageMetadata)
    }
    count = 0
    for index, info in sorted(ckpt.storage.items(), key=lambda kv: (kv[1].relative_path, kv[1].offset)):
        if index.fqn not in keys:
            continue
        path = ckpt.iteration_dir / info.relative_path
        where = f"{path} ({index.fqn} at byte {info.offset})"
        if getattr(info, "transform_descriptors", None):
            raise ConversionError(
                f"{where}: stored with transforms {info.transform_descriptors}, not supported"
            )
        try:
            with open(path, "rb") as file:
                file.seek(info.offset)
                data = file.read(info.length)
        except OSError as exc:
            raise ConversionError(f"{where}: unreadable ({exc.strerror})") from None
        value = safe_pickle.load(data, where=where)
        inner = safe_pickle.bytes_of(value)
        if inner is not None:  # megatron-core torch.loads it too, when it is a torch file at all
            try:
                safe_pickle.load(inner, where=where)
            except ConversionError as exc:
                if "refusing to unpickle" in str(exc):
                    raise
        count += 1
    return count
