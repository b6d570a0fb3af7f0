"""`parity-check --megatron-lm DIR`: the Megatron side built by NVIDIA's own model code.

Instead of this project's builder (modeling/megatron/builder.py), the Megatron side is the model
that the user's Megatron-LM checkout builds and loads (its `examples/multimodal/model.py`
`model_provider`, `nvlm/internvit.py`, `load_checkpoint`; modeling/megatron/megatron_lm.py runs
it on the checkpoint's own TP/PP ranks). The cases are the same (cases.py): same questions, same
pixel tensors. NVIDIA's side builds its own prompt (its MultimodalTokenizer's
`tokenize_conversation` in the checkpoint's prompt format; tile tags and image embeddings inserted
inside `LLaVAModel.forward`), so both sides are compared on the ids NVIDIA's LLM saw: each case's
`input_ids` become those (image positions -> the HF image-context token) before the HF side runs.
The report's prompt check says where `chat()`'s prompt (our processor) differs from NVIDIA's, and
whether our own emulation of NVIDIA's prompt (`cases.megatron_prompt_ids`) gives NVIDIA's ids.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from . import cases as cases_mod
from .checkpoint_safety import open_checked


def nvidia_question(case) -> str:
    """The user turn as NVIDIA's run_text_generation writes it: `<image>\\n` before the question
    when the image belongs to this turn (as the release's chat() does too)."""
    question = case.question
    if case.image is not None and not case.history and "<image>" not in question:
        question = "<image>\n" + question
    return question


def job_for(
    megatron_lm,
    checkpoint,
    hf_dir,
    cases,
    *,
    dtype,
    steps,
    eos,
    true_vocab,
    trust_pickle,
    logits=True,
    flags=(),
):
    from modeling.megatron import megatron_lm as nvidia

    ckpt = open_checked(Path(checkpoint), trust_pickle=trust_pickle)
    return nvidia.MegatronLMJob(
        megatron_lm=str(Path(megatron_lm).resolve()),
        checkpoint=str(Path(checkpoint).resolve()),
        tokenizer=str(Path(hf_dir).resolve()),
        tp=ckpt.tp,
        pp=ckpt.pp,
        dtype=dtype,
        cases=[
            {
                "conversation": nvidia.conversation(nvidia_question(c), c.history),
                "pixel_values": c.pixel_values,
                "num_tiles": c.num_tiles,
            }
            for c in cases
        ],
        sizes=nvidia.checkpoint_sizes(ckpt),
        collect_layers=logits,
        logits=logits,
        generate_tokens=steps,
        eos_token_id=eos,
        true_vocab=true_vocab,
        trust_pickle=trust_pickle,
        extra_flags=list(flags),
    )


def nvidia_ids(entry: dict, image_token_id: int) -> list[int]:
    """The ids NVIDIA's LLM saw, with the HF image-context token at every image position."""
    return [image_token_id if m else t for t, m in zip(entry["combined_ids"], entry["image_mask"])]


def run_cases(
    megatron_lm,
    checkpoint,
    hf_dir,
    cases,
    tokenizer,
    config,
    *,
    dtype: str = "float32",
    steps: int = 0,
    eos: int | None = None,
    true_vocab: int | None = None,
    trust_pickle: bool = False,
    logits: bool = True,
    flags=(),
) -> dict:
    """NVIDIA's side on `cases`; each case's input_ids replaced by NVIDIA's (see module docstring).
    Returns {"outputs": [MegatronOutputs], "native_ids": [NVIDIA's prompt], "generated": [...],
    "prompts": [prompt check], "info", "megatron_code": one line naming the code}."""
    from modeling.megatron import megatron_lm as nvidia
    from modeling.megatron.runner import MegatronOutputs

    job = job_for(
        megatron_lm,
        checkpoint,
        hf_dir,
        cases,
        dtype=dtype,
        steps=steps,
        eos=eos,
        true_vocab=true_vocab,
        trust_pickle=trust_pickle,
        logits=logits,
        flags=flags,
    )
    result = nvidia.run(job)
    outputs, generated, prompts = [], [], []
    for case, entry in zip(cases, result["cases"]):
        theirs = nvidia_ids(entry, config.img_context_token_id)
        ours = case.input_ids[0].tolist()
        check = cases_mod.prompt_difference(ours, theirs, tokenizer)
        check["emulation_matches_megatron"] = cases_mod.megatron_prompt_ids(case, tokenizer, config) == theirs
        prompts.append(check)
        case.input_ids = torch.tensor([theirs], dtype=torch.int64)
        if logits:
            outputs.append(MegatronOutputs(logits=entry["logits"], layers=entry["layers"]))
        generated.append(entry.get("generated"))
    return {
        "outputs": outputs,
        "native_ids": [entry["native_ids"] for entry in result["cases"]],
        "generated": generated,
        "prompts": prompts,
        "info": result["info"],
        "megatron_code": nvidia.describe(result["info"]),
    }


_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def logits_side(megatron_lm, flags, checkpoint, hf_dir, cases, tokenizer, config, *, dtype, steps, eos, **kw):
    """`parity-check logits --megatron-lm`: NVIDIA's side on `cases` (ids replaced, see run_cases)
    and, in bf16, its float32 logits on the same inputs (the noise floor of the relative checks)."""
    reference = None
    if dtype == "bf16":
        fp32 = run_cases(
            megatron_lm,
            checkpoint,
            hf_dir,
            copy.deepcopy(cases),
            tokenizer,
            config,
            dtype="float32",
            flags=flags,
            **kw,
        )
        reference = [output.logits for output in fp32["outputs"]]
    result = run_cases(
        megatron_lm,
        checkpoint,
        hf_dir,
        cases,
        tokenizer,
        config,
        dtype=_DTYPES[dtype],
        steps=steps,
        eos=eos,
        flags=flags,
        **kw,
    )
    return result, reference


def bench_side(megatron_lm, flags, checkpoint, hf_dir, cases, tokenizer, config, *, dtype, steps, eos, **kw):
    """`parity-check bench --megatron-lm`: NVIDIA's greedy answers (one item at a time: its tile
    tagging takes one image per batch) and, in bf16, its float32 answers."""
    reference = None
    if dtype == "bf16":
        fp32 = run_cases(
            megatron_lm,
            checkpoint,
            hf_dir,
            copy.deepcopy(cases),
            tokenizer,
            config,
            dtype="float32",
            steps=steps,
            eos=eos,
            logits=False,
            flags=flags,
            **kw,
        )
        reference = fp32["generated"]
    result = run_cases(
        megatron_lm,
        checkpoint,
        hf_dir,
        cases,
        tokenizer,
        config,
        dtype=_DTYPES[dtype],
        steps=steps,
        eos=eos,
        logits=False,
        flags=flags,
        **kw,
    )
    return result, reference
