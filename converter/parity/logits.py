"""`parity-check logits`: the Megatron checkpoint and the converted folder on identical inputs.

The Megatron side runs at the checkpoint's own TP/PP in TP*PP freshly started ranks (gloo on CPU,
NCCL on GPU); the HF side runs our class from the folder (`device_map="auto"` over several GPUs
when asked for cuda). Both get the same token ids and pixel tensors; every ViT layer, projector
and LLM layer output is recorded on both sides through forward hooks. In bfloat16 Megatron also
runs in float32 on the same inputs: the reference both bf16 runs are measured against (judge.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from . import cases as cases_mod
from .compare import first_jump, layer_errors, logits_metrics


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


def distance(reference: torch.Tensor, run: torch.Tensor) -> dict:
    """How far a run's logits are from a reference run's (the bf16 noise floors, judge.py)."""
    metrics = logits_metrics(reference, run)
    return {k: metrics[k] for k in ("kl", "max_abs_diff", "mean_abs_diff", "top1_agreement", "positions")}


def forward_with_reference(rank: int, job, reference_job) -> dict | None:
    """One set of Megatron ranks for both runs of a bf16 check (`run_ranks(forward_with_reference,
    layout, job, reference_job)`): the job as asked, then `reference_job` (the same inputs in
    float32) on the model built afresh; rank 0's result gets the reference outputs as `reference`."""
    from modeling.megatron.session import forward_rank

    result = forward_rank(rank, job)
    reference = forward_rank(rank, reference_job)
    if result is not None:
        result["reference"] = reference["outputs" if reference["outputs"] else "generated"]
    return result


def megatron_logits(checkpoint: Path, cases, dtype: str, config, *, trust_pickle: bool, backend: str):
    """Megatron's logits of every case (no layers, no generation) from `checkpoint` at its own
    layout, in `dtype` ("float32" or "bfloat16"): the same weights at another TP/PP
    (`--megatron-other-layout`)."""
    from modeling.megatron.builder import ParallelLayout
    from modeling.megatron.distributed import run_ranks
    from modeling.megatron.session import ForwardJob, ModelSource, forward_rank

    from .checkpoint_safety import open_checked

    args = open_checked(checkpoint, trust_pickle=trust_pickle).args
    layout = ParallelLayout(args.tensor_model_parallel_size, args.pipeline_model_parallel_size)
    job = ForwardJob(
        ModelSource(checkpoint=str(checkpoint), trust_pickle=trust_pickle),
        layout,
        [{"input_ids": c.input_ids, "pixel_values": c.pixel_values} for c in cases],
        dtype=dtype,
        image_token_id=config.img_context_token_id,
    )
    outputs = run_ranks(forward_rank, layout, job, backend=backend)["outputs"]
    return [output.logits for output in outputs]


def build_cases(spec: str, tokenizer, config):
    chosen = (
        cases_mod.default_cases(config.image_size) if spec == "default" else cases_mod.load_cases(Path(spec))
    )
    return cases_mod.prepare(chosen, tokenizer, config)
