"""How far apart two runs are: logits metrics over every position, and per-layer errors.

All metrics are over ALL positions and the true vocabulary (padded rows excluded), computed in
float64: max and mean absolute difference, relative L2 (||a - b|| / ||a||, Megatron as the
reference), cosine similarity (per position, averaged), KL(Megatron || HF) per position
(averaged), top-1 agreement (same argmax) and top-5 agreement (share of Megatron's top-5 tokens
found in HF's top-5).
"""

from __future__ import annotations

import torch


def kl_per_position(reference: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """KL(reference || other) of the softmax of each row of logits, in float64."""
    log_p, log_q = torch.log_softmax(reference.double(), -1), torch.log_softmax(other.double(), -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def logits_metrics(megatron: torch.Tensor, hf: torch.Tensor) -> dict[str, float]:
    a, b = megatron.double().reshape(-1, megatron.shape[-1]), hf.double().reshape(-1, hf.shape[-1])
    diff = (a - b).abs()
    kl = kl_per_position(a, b)
    top5_a, top5_b = a.topk(5, -1).indices, b.topk(5, -1).indices
    overlap = (top5_a.unsqueeze(-1) == top5_b.unsqueeze(-2)).any(-1).double().mean(-1)
    return {
        "max_abs_diff": diff.max().item(),
        "mean_abs_diff": diff.mean().item(),
        "rel_l2": ((a - b).norm() / a.norm()).item(),
        "cosine": torch.nn.functional.cosine_similarity(a, b, dim=-1).mean().item(),
        "kl": kl.mean().item(),
        "kl_max": kl.max().item(),
        "top1_agreement": (a.argmax(-1) == b.argmax(-1)).double().mean().item(),
        "top5_agreement": overlap.mean().item(),
        "positions": a.shape[0],
    }


def layer_errors(megatron: dict[str, torch.Tensor], hf: dict[str, torch.Tensor]) -> list[dict]:
    """Relative L2 error of each module's output, in model order (ViT layers, projector, LLM layers)."""
    rows = []
    for name in ordered(set(megatron) & set(hf)):
        a, b = megatron[name].double(), hf[name].double()
        if a.shape != b.shape:
            rows.append(
                {
                    "module": name,
                    "rel_l2": float("nan"),
                    "max_abs_diff": float("nan"),
                    "note": f"shape {tuple(a.shape)} vs {tuple(b.shape)}",
                }
            )
            continue
        rows.append(
            {
                "module": name,
                "rel_l2": ((a - b).norm() / a.norm().clamp_min(1e-30)).item(),
                "max_abs_diff": (a - b).abs().max().item(),
            }
        )
    return rows


def ordered(names) -> list[str]:
    def key(name: str):
        tower = {"vision": 0, "projector": 1, "llm": 2}[name.split(".")[0]]
        return tower, int(name.rsplit(".", 1)[-1]) if name[-1].isdigit() else 0

    return sorted(names, key=key)


def first_jump(rows: list[dict], factor: float = 10.0, floor: float = 1e-6) -> str | None:
    """The first module whose relative error is `factor` times its predecessor's (and above `floor`):
    where a difference enters rather than where it is carried along."""
    previous = None
    for row in rows:
        error = row["rel_l2"]
        if error != error:  # NaN: a shape mismatch is a jump
            return row["module"]
        if error > floor and (previous is None or error > factor * max(previous, floor)):
            return row["module"]
        previous = error
    return None
