#!/usr/bin/env bash
# The megatron-core 0.19.2 run recorded in this folder (docs/PARITY.md), on a one-GPU H200 machine
# with its own torch 2.11 and Python 3.12: the wheel from .whl/ installed beside them, the shipped
# trained example converted and resharded to TP=1; `parity-check logits` fp32 and bf16 with the CI
# thresholds, JUnit and --card: TP=1 on CUDA, TP=2 on the CPUs (two ranks need two GPUs: NCCL
# refuses two ranks on one GPU, as parity-check says up front); the card verified; last, TP=2 bf16
# on the CPUs with --hf-numerics megatron (bit-identity on this machine's CPU kernels?).
# From the repository root: bash docs/results/parity/mcore-0.19.2/run.sh OUT
set -u
OUT=${1:?usage: run.sh OUT}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/megatron_core-0.19.2-*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 PYTHONWARNINGS=ignore
T=tests/fixtures/nvlm-d-small-trained/megatron-tp2
W=/tmp/parity-run
R=$OUT/results
mkdir -p "$W" "$R"
step() {  # NAME COMMAND...: output to $R/NAME.txt; exit status and seconds to steps.txt
    local name=$1 start=$SECONDS; shift
    timeout 200 "$@" > "$R/$name.txt" 2>&1
    echo "$name: exit $? in $((SECONDS - start)) s" | tee -a "$R/steps.txt"
    cp $W/hf/README.md $R/card.md 2>/dev/null; cp $W/hf/nvlm_port_manifest.json $R/ 2>/dev/null
    tar -C "$OUT" -czf "$OUT/results.tar.gz" results; cp "$R/steps.txt" "$OUT/steps.txt"
}
python3 -c "import sys, torch, transformers, megatron.core as m; print('python', sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__, 'megatron-core', m.package_info.__version__, m.__file__, torch.cuda.get_device_name(0), torch.cuda.device_count())" | tee "$R/environment.txt"
step convert python3 -m converter.cli megatron-to-hf $T $W/hf --tokenizer tests/fixtures/tiny-tokenizer
step reshard-tp1 python3 -m converter.cli reshard $T $W/tp1 --tp 1
P="python3 -m converter.parity_cli logits --hf $W/hf --generate 16 --tolerances .github/parity-tolerances.toml --card $W/hf"
step logits-tp1-fp32 $P --megatron $W/tp1 --device cuda --dtype fp32 --junit $R/tp1-fp32/junit.xml --report $R/tp1-fp32
step logits-tp1-bf16 $P --megatron $W/tp1 --device cuda --dtype bf16 --junit $R/tp1-bf16/junit.xml --report $R/tp1-bf16
export CUDA_VISIBLE_DEVICES=
step logits-tp2-fp32 $P --megatron $T --device cpu --dtype fp32 --junit $R/tp2-fp32/junit.xml --report $R/tp2-fp32
step logits-tp2-bf16 $P --megatron $T --device cpu --dtype bf16 --junit $R/tp2-bf16/junit.xml --report $R/tp2-bf16
step verify python3 -m converter.cli verify $W/hf
unset CUDA_VISIBLE_DEVICES
step refusal-tp2-cuda $P --megatron $T --device cuda --dtype fp32 --report $R/refused
export CUDA_VISIBLE_DEVICES=
step numerics-tp2-bf16 $P --megatron $T --device cpu --dtype bf16 --hf-numerics megatron --generate 0 --report $R/tp2-bf16-numerics
