#!/usr/bin/env bash
# The one prepared GPU run (on the device machine, from the repository root): kandinsky-rs'
# gpu_check (parity on CUDA, kernel checks, timings), the same with candle's plain kernels for
# the UNet, and diffusers' side on the same card. Needs .gpu/{gpu_check,gpu-env.sh} built here
# with ../shared/cuda (see benches/RESULTS.md) and .whl/ with the diffusers wheel.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
source .gpu/gpu-env.sh >"$OUT/env.log" 2>&1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/card.txt"
export KANDINSKY_FIXTURES=$PWD/fixtures
echo "== kandinsky-rs gpu_check"
timeout 200 .gpu/gpu_check 2>&1 | tee "$OUT/rust.log"
echo "== kandinsky-rs UNet with candle's plain GroupNorm"
KANDINSKY_PLAIN_KERNELS=1 timeout 80 .gpu/gpu_check --timings-only --unet-only --quick 2>&1 | tail -8 | tee "$OUT/rust-plain.log"
echo "== diffusers"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)" | tee "$OUT/versions.txt"
timeout 200 python3 xtask/bench/diffusers_bench.py --device cuda --dtype fp16 --unet 64,96,128 --movq 512,768,1024 \
    --prior --text --attn 96 --json "$OUT/diffusers-fp16.jsonl" 2>&1 | grep -v Warning | tee "$OUT/diffusers.log"
timeout 60 python3 xtask/bench/diffusers_bench.py --device cuda --dtype bf16 --unet 96 --json "$OUT/diffusers-bf16.jsonl" 2>&1 | tail -3
echo "== rust table"
grep -A200 '^check' "$OUT/rust.log"
