#!/usr/bin/env bash
# The whole GPU parity run in one command (for a CI that has GPUs, or the device machine):
#   scripts/parity_gpu.sh TOKENIZER_DIR OUT_DIR [TP...]
# For each TP: full-width nvlm-d-72b dims with LLM_LAYERS / VIT_LAYERS layers (default 2 / 2),
# seeded weights saved by Megatron-Core (legacy format, bf16), converted to HF, then
# parity-check logits in bfloat16 (Megatron on TP GPUs with NCCL, HF on GPU 0), as shipped, with eager
# attention, with the release's projector LayerNorm eps (1e-5 vs 1e-6), and with Megatron's rounding
# (--hf-numerics megatron); then scripts/parity_ablation.py (each rounding source alone and cumulative).
# TOKENIZER_DIR: the Qwen2.5 tokenizer of NVLM-D-72B (vocab.json, merges.txt, tokenizer_config.json).
set -euo pipefail
TOKENIZER=$1; OUT=$2; shift 2
TPS=${*:-1 2}
LLM_LAYERS=${LLM_LAYERS:-2}; VIT_LAYERS=${VIT_LAYERS:-2}
WORK=${WORK:-/tmp/nvlm-parity}
mkdir -p "$OUT" "$WORK"
for TP in $TPS; do
  CKPT=$WORK/megatron-tp$TP; HF=$WORK/hf-tp$TP
  rm -rf "$CKPT" "$HF"
  python3 scripts/make_megatron_checkpoint.py --preset nvlm-d-72b --num-layers "$LLM_LAYERS" \
    --vision-num-layers "$VIT_LAYERS" --tp "$TP" --dtype bfloat16 --format torch "$CKPT"
  python3 -m converter.cli megatron-to-hf "$CKPT" "$HF" --tokenizer "$TOKENIZER"
  for RUN in "sdpa:" "eager:--hf-attn eager" "eps:--hf-projector-eps 1e-5" "numerics:--hf-numerics megatron"; do
    NAME=${RUN%%:*}; EXTRA=${RUN#*:}
    # shellcheck disable=SC2086
    START=$SECONDS
    python3 -m converter.parity_cli logits --megatron "$CKPT" --hf "$HF" \
      --device cuda --dtype bf16 --report "$OUT/tp$TP-$NAME" $EXTRA 2>&1 | grep -v -i "warn\|return func" || true
    echo "tp$TP-$NAME: parity-check wall $((SECONDS - START)) s"
  done
  python3 scripts/parity_ablation.py --megatron "$CKPT" --hf "$HF" --device cuda --out "$OUT/tp$TP-ablation" \
    2>&1 | grep -v -i "warn\|return func" || true
done
