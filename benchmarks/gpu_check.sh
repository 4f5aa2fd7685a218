#!/usr/bin/env bash
# The GPU checks of the performance and trainer issues, as one script for a short device lease.
#
#   bash benchmarks/gpu_check.sh OUT_DIR [train|merge|all]     (DEVICE=cpu SIZE=tiny SHAPE=tiny for a dry run)
#
# train: benchmarks/bench_train.py on a Qwen2-0.5B shape (training and annotation against the HF Trainer
#        and the authors' batch-1 loop), about 5 minutes on an H200.
# merge: a TIES merge of 7B-shaped tensors (the Llama-2-7B shape cut to 8 layers) with --device cuda,
#        next to the I/O floor of the same inputs and output: read / compute / write.
# Runs from a plain checkout with the machine's own python3 (torch, transformers, peft, click, safetensors,
# tqdm, pyyaml, accelerate): no virtualenv, nothing installed. Results land in OUT_DIR.
set -euo pipefail
out=${1:?usage: gpu_check.sh OUT_DIR [train|merge|all]}
what=${2:-all}
device=${DEVICE:-cuda}
size=${SIZE:-7b-8l}
shape=${SHAPE:-qwen0.5b}
python=${PYTHON:-python3}
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
cd "$root"
{ command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; \
  "$python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"; } \
  >"$out/machine.txt" 2>&1 || true

if [[ $what == train || $what == all ]]; then
    "$python" benchmarks/bench_train.py --shape "$shape" --device "$device" 2>&1 | tee "$out/train.md"
fi

if [[ $what == merge || $what == all ]]; then
    work=${WORK:-/tmp/gift-merge-gpu-check}
    mkdir -p "$work/bin"
    printf '#!/bin/sh\nexec %s -m gift_merge.cli "$@"\n' "$python" >"$work/bin/gift-merge"
    chmod +x "$work/bin/gift-merge"
    "$python" benchmarks/make_models.py --size "$size" --variants base,ft1,ft2 --out "$work/models/$size" 2>&1 |
        tail -3
    "$python" benchmarks/run.py --size "$size" --work "$work" --tools gift-merge --methods ties --runs 2 \
        --no-startup --gift-merge "$work/bin/gift-merge" --gift-merge-arg=--device="$device" \
        --gift-merge-arg=--engine=torch --output "$out/ties-$size.md" 2>&1 | tail -8
fi
