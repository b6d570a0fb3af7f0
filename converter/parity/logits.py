"""`parity-check logits`: the Megatron checkpoint and the converted folder on identical inputs.

The Megatron side runs at the checkpoint's own TP/PP in TP*PP freshly started ranks (gloo on CPU,
NCCL on GPU); the HF side runs our class from the folder (`device_map="auto"` over several GPUs
when asked for cuda). Both get the same token ids and pixel tensors; every ViT layer, projector
and LLM layer output is recorded on both sides through forward hooks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from . import cases as cases_mod
from .compare import first_jump, layer_errors, logits_metrics

DEFAULT_TOLERANCES = {
    # float32: the two codebases compute the same math; only summation order differs.
    "fp32": {"max_abs_diff": 1e-4, "min_top1_agreement": 1.0, "min_greedy_match": 1.0, "max_kl": 1e-6},
    # bfloat16: rounding of every matmul and norm; NVLM_FACTS section 6.
    "bf16": {"max_abs_diff": None, "min_top1_agreement": 0.995, "min_greedy_match": None, "max_kl": 1e-3},
}


@dataclass
class HFRun:
    logits: torch.Tensor
    layers: dict[str, torch.Tensor]


def _record(model) -> tuple[dict, list]:
    outputs, handles = {}, []

    def hook(name):
        def keep(_module, _inputs, output):
            tensor = output[0] if isinstance(output, tuple) else output
            outputs[name] = tensor.detach().float().cpu()

        return keep

    for j, layer in enumerate(model.vision_model.encoder.layers):
        handles.append(layer.register_forward_hook(hook(f"vision.layers.{j}")))
    handles.append(model.mlp1.register_forward_hook(hook("projector")))
    for i, layer in enumerate(model.language_model.model.layers):
        handles.append(layer.register_forward_hook(hook(f"llm.layers.{i}")))
    return outputs, handles


def load_hf(
    folder: Path, dtype: torch.dtype, device: str, attn: str = "sdpa", projector_eps: float | None = None
):
    from modeling import NVLM_D_Model

    kwargs = {"dtype": dtype, "attn_implementation": attn}
    if device == "cuda":
        kwargs["device_map"] = "auto" if torch.cuda.device_count() > 1 else {"": 0}
    model = NVLM_D_Model.from_pretrained(folder, **kwargs).eval()
    if projector_eps is not None:
        model.mlp1[0].eps = projector_eps
    return model


@torch.no_grad()
def run_hf(model, case, true_vocab: int, layers: bool = True, on_cpu: bool = True) -> HFRun:
    """Logits over the true vocab (float32; on the model's device unless `on_cpu`) and, with
    `layers`, every recorded module output."""
    layers, handles = _record(model) if layers else ({}, [])
    try:
        device = model.language_model.get_input_embeddings().weight.device
        pixels = None if case.pixel_values is None else case.pixel_values.to(device, model.dtype)
        logits = model(pixel_values=pixels, input_ids=case.input_ids.to(device)).logits
    finally:
        for handle in handles:
            handle.remove()
    logits = logits[..., :true_vocab].float()
    return HFRun(logits.cpu() if on_cpu else logits, layers)


@torch.no_grad()
def generate_hf(model, case, steps: int, eos: int) -> list[int]:
    device = model.language_model.get_input_embeddings().weight.device
    pixels = None if case.pixel_values is None else case.pixel_values.to(device, model.dtype)
    ids = case.input_ids.to(device)
    out = model.generate(
        pixel_values=pixels,
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=steps,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    return out[0].tolist()


def compare_case(name, case, megatron, hf: HFRun, generated_m, generated_h, prompt_check) -> dict:
    metrics = logits_metrics(megatron.logits, hf.logits)
    layers = layer_errors(megatron.layers, hf.layers)
    return {
        "name": name,
        "tokens": int(case.input_ids.shape[1]),
        "tiles": case.num_tiles,
        **metrics,
        "greedy_match": float(generated_m == generated_h) if generated_m is not None else None,
        "greedy_megatron": generated_m,
        "greedy_hf": generated_h,
        "layers": layers,
        "first_jump": first_jump(layers),
        "prompt_check": prompt_check,
    }


def within(case: dict, tolerances: dict) -> bool:
    checks = [
        tolerances.get("max_abs_diff") is None or case["max_abs_diff"] <= tolerances["max_abs_diff"],
        tolerances.get("min_top1_agreement") is None
        or case["top1_agreement"] >= tolerances["min_top1_agreement"],
        tolerances.get("max_kl") is None or case["kl"] <= tolerances["max_kl"],
        tolerances.get("min_greedy_match") is None
        or case["greedy_match"] is None
        or case["greedy_match"] >= tolerances["min_greedy_match"],
    ]
    return all(checks)


def build_cases(spec: str, tokenizer, config):
    chosen = (
        cases_mod.default_cases(config.image_size) if spec == "default" else cases_mod.load_cases(Path(spec))
    )
    return cases_mod.prepare(chosen, tokenizer, config)
