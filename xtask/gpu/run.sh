#!/usr/bin/env bash
# The one prepared GPU run (on the device machine, from the repository root, carry
# [".gpu", ".whl"]; prepare both here with `bash xtask/gpu/build.sh`). About 9 minutes, parts
# in order of priority (numbered as first written):
#   1. gpu_check: tiny-fixture parity on CUDA, every kernel against candle's plain path,
#      timings with peak pool memory (CUDA pool/event tuning on: kandinsky_core::device);
#   2. the UNet timings again with the device as candle opens it (KANDINSKY_CUDA_DEFAULTS);
#   3. the UNet + MoVQ timings with cuDNN convolutions (gpu_check_cudnn);
#   4. the UNet timings with the mma.sync attention kernel (KANDINSKY_FLASH=mma);
#   5. diffusers/PyTorch on the same card (fp16), from the carried wheels;
#   6. ncu: the GPU time of every kernel of one 768 px UNet step and one MoVQ decode.
# Each part writes its log under $OUT as it goes, so a timeout keeps what finished.
set -uo pipefail
# Every part's timeout is cut to what is left of DEADLINE seconds (the device call's limit
# less a margin), so the archive at the end is always written.
DEADLINE=${DEADLINE:-575}
t() { local left=$((DEADLINE - SECONDS - 10)); [ "$left" -lt "$1" ] && echo $((left > 1 ? left : 1)) || echo "$1"; }
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
timeout $(t 200) $BIN/gpu_check --quick >"$OUT/rust.log" 2>&1; echo "exit $?"
grep -E '^(device|no CUDA|GPU_CHECK)' "$OUT/rust.log"
echo "== 6. ncu: kernels of one 768 px UNet step / MoVQ decode (f16, tuned, im2col)"
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
for w in unet movq; do
    timeout $(t 75) "$NCU" --profile-from-start off --clock-control none --cache-control none \
        --metrics gpu__time_duration.sum --csv $BIN/gpu_check --profile $w \
        >"$OUT/ncu-$w.csv" 2>"$OUT/ncu-$w.err"; echo "ncu $w exit $?"
    python3 xtask/gpu/ncu_summary.py "$OUT/ncu-$w.csv" 22 2>&1 | tee "$OUT/ncu-$w.txt"
done
echo "== 3. cuDNN convolutions (gpu_check_cudnn)"
timeout $(t 100) $BIN/gpu_check_cudnn --timings-only --quick 2>&1 \
    | tee "$OUT/rust-cudnn.log" | grep -E '^(unet|movq|conv|host|timings)'
echo "== 2. UNet with the device as candle opens it (KANDINSKY_CUDA_DEFAULTS=1)"
KANDINSKY_CUDA_DEFAULTS=1 timeout $(t 70) $BIN/gpu_check --timings-only --unet-only --quick 2>&1 \
    | tee "$OUT/rust-defaults.log" | grep -E '^(unet|host|conv)'
echo "== 5. diffusers"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)" | tee "$OUT/versions.txt"
timeout $(t 150) python3 xtask/bench/diffusers_bench.py --device cuda --dtype fp16 --unet 64,96,128 --movq 512,768 \
    --prior --text --attn 96 --json "$OUT/diffusers-fp16.jsonl" 2>&1 | grep -v Warning | tee "$OUT/diffusers.log"
echo "== 4. UNet with the mma.sync attention kernel in the model (KANDINSKY_FLASH=mma)"
KANDINSKY_FLASH=mma timeout $(t 70) $BIN/gpu_check --timings-only --unet-only --quick 2>&1 \
    | tee "$OUT/rust-mma.log" | grep -E '^(unet|timings)'
echo "== rust table (tuned, im2col)"
grep -A200 '^check' "$OUT/rust.log"
# Files that come back from the device are limited in number: one archive of every log.
(cd "$OUT" && tar czf logs.tgz --exclude=logs.tgz ./* && find . -type f ! -name logs.tgz -delete)
