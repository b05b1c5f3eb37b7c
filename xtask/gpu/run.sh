#!/usr/bin/env bash
# The one prepared GPU run (on the device machine, from the repository root, carry
# [".gpu", ".whl"]; prepare both here with `bash xtask/gpu/build.sh`). About 8 minutes:
#   1. gpu_check: tiny-fixture parity on CUDA, every kernel against candle's plain path,
#      timings with peak pool memory (CUDA pool/event tuning on: kandinsky_core::device);
#   2. the UNet timings again with the device as candle opens it (KANDINSKY_CUDA_DEFAULTS);
#   3. the UNet + MoVQ timings with cuDNN convolutions (gpu_check_cudnn);
#   4. the UNet timings with the mma.sync attention kernel (KANDINSKY_FLASH=mma);
#   5. diffusers/PyTorch on the same card (fp16), from the carried wheels.
# Each part writes its log under $OUT as it goes, so a timeout keeps what finished.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
source .gpu/gpu-env.sh >"$OUT/env.log" 2>&1
BIN=/tmp/gpu-bin
mkdir -p $BIN
for b in gpu_check gpu_check_cudnn; do gunzip -c .gpu/$b.gz >$BIN/$b && chmod +x $BIN/$b; done
# cuDNN (for gpu_check_cudnn): PyTorch's venv ships libcudnn.so.9.
for d in /opt/torch/.venv/lib/python3*/site-packages/nvidia/cudnn/lib \
         /opt/torch/.venv/lib/python3*/site-packages/nvidia/cu13/lib; do
    [ -e "$d/libcudnn.so.9" ] && export LD_LIBRARY_PATH="$d:$LD_LIBRARY_PATH" && break
done
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/card.txt"
export KANDINSKY_FIXTURES=$PWD/fixtures
echo "== 1. kandinsky-rs gpu_check (tuned device)"
timeout 200 $BIN/gpu_check --quick >"$OUT/rust.log" 2>&1; echo "exit $?"
grep -E '^(device|no CUDA|GPU_CHECK)' "$OUT/rust.log"
echo "== 2. UNet with the device as candle opens it (KANDINSKY_CUDA_DEFAULTS=1)"
KANDINSKY_CUDA_DEFAULTS=1 timeout 70 $BIN/gpu_check --timings-only --unet-only --quick 2>&1 \
    | tee "$OUT/rust-defaults.log" | grep -E '^(unet|host|conv)'
echo "== 3. cuDNN convolutions (gpu_check_cudnn)"
timeout 100 $BIN/gpu_check_cudnn --timings-only --quick 2>&1 \
    | tee "$OUT/rust-cudnn.log" | grep -E '^(unet|movq|conv|host|timings)'
echo "== 4. UNet with the mma.sync attention kernel in the model (KANDINSKY_FLASH=mma)"
KANDINSKY_FLASH=mma timeout 70 $BIN/gpu_check --timings-only --unet-only --quick 2>&1 \
    | tee "$OUT/rust-mma.log" | grep -E '^(unet|timings)'
echo "== 5. diffusers"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)" | tee "$OUT/versions.txt"
timeout 150 python3 xtask/bench/diffusers_bench.py --device cuda --dtype fp16 --unet 64,96,128 --movq 512,768 \
    --prior --text --attn 96 --json "$OUT/diffusers-fp16.jsonl" 2>&1 | grep -v Warning | tee "$OUT/diffusers.log"
echo "== rust table (tuned, im2col)"
grep -A200 '^check' "$OUT/rust.log"
