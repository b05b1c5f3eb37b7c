#!/usr/bin/env bash
# The prepared GPU run (on the device machine, from the repository root, carry
# [".gpu", ".whl"]; prepare both here with `bash xtask/gpu/build.sh`). Every part on takes
# longer than one device call (≈ 10–13 min estimated): parts run in order of priority and
# each one's timeout is cut to what DEADLINE leaves, so the last ones (ncu, diffusers) are
# the first to go; VAR=0 skips a part. Every part logs under $OUT:
#   1. gpu_check: tiny-fixture parity on CUDA, every kernel against candle's plain path,
#      timings with peak pool memory;
#   2. the opt-in switches, each part skipped with its variable set to 0, in this order:
#      WIDE, the attention kernel with 32 query rows per warp (checked so far only under the
#      host emulation, xtask/gpu/emu): its correctness and TFLOP/s beside the mma kernel's
#      (`gpu_check --attention-only`, own processes: a kernel fault poisons the context),
#      then the UNet with it (KANDINSKY_FLASH=wide, and token-major); the same rows list the
#      Hopper wgmma kernels, and the UNet runs with them (KANDINSKY_FLASH=wgmma, wgmma-pipe);
#      TOKEN_MAJOR, the UNet with the token-major attention kernel (no head copies);
#      CONV_NORM, the UNet and MoVQ with the ResNet norms inside the convolutions' copy
#      kernel (KANDINSKY_CONV_NORM=1), then the UNet and the whole text2img (eager and with
#      CUDA graphs) with both switches; CONV_GEMM (before TOKEN_MAJOR), the one-kernel
#      convolution GEMMs (KANDINSKY_CONV_GEMM=mma, wgmma, mma-1copy, wgmma-1copy): their
#      rows, then the UNet and MoVQ with the fastest of them;
#      ALL, the UNet and the text2img with every switch that won on its own; BANDED, the timings with the convolution scratch
#      banded at 64 MiB (peak memory); PLAIN, the UNet with candle's own kernels
#      (KANDINSKY_PLAIN_KERNELS=1, measured before: run 9; only with PLAIN=1);
#   3. ncu (NCU=0 skips it): the GPU time of every kernel of one 768 px UNet step and one
#      MoVQ decode, with the switches in NCU_ENV set;
#   4. with DIFFUSERS=1, diffusers/PyTorch on the same card (fp16), from the carried wheels.
set -uo pipefail
# Every part's timeout is cut to what is left of DEADLINE seconds (the device call's limit
# less a margin), so the archive at the end is always written.
DEADLINE=${DEADLINE:-575}
# Measured in run 9 (candle's own kernels, 5.6× slower): off unless PLAIN=1.
PLAIN=${PLAIN:-0}
t() { local left=$((DEADLINE - SECONDS - 10)); [ "$left" -lt "$1" ] && echo $((left > 1 ? left : 1)) || echo "$1"; }
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
source .gpu/gpu-env.sh >"$OUT/env.log" 2>&1
BIN=/tmp/gpu-bin
mkdir -p $BIN
gunzip -c .gpu/gpu_check.gz >$BIN/gpu_check && chmod +x $BIN/gpu_check
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/card.txt"
export KANDINSKY_FIXTURES=$PWD/fixtures
echo "== 1. kandinsky-rs gpu_check"
timeout $(t 200) $BIN/gpu_check --quick >"$OUT/rust.log" 2>&1; echo "exit $?"
grep -E '^(device|no CUDA|GPU_CHECK)' "$OUT/rust.log"
# ab SKIP_VAR "ENV=VALUE ..." LIMIT LOG PATTERN ARGS...: gpu_check again with the switches set,
# unless $SKIP_VAR is 0; the log under $OUT, the lines matching PATTERN printed.
ab() {
    local skip=$1 env=$2 limit=$3 log=$4 pattern=$5
    shift 5
    [ "${!skip:-1}" = 1 ] || return 0
    echo "== $env"
    # shellcheck disable=SC2086 # several assignments in one word
    env $env timeout "$(t "$limit")" $BIN/gpu_check "$@" 2>&1 | tee "$OUT/$log" | grep -E "$pattern"
}
# Own processes: a faulting kernel poisons its process's CUDA context, not the others'.
ab WIDE KANDINSKY_FLASH=wide 40 rust-wide-kernels.log '^(attention|GPU_CHECK)' \
    --attention-only mma,mma-tm,wide,wide-tm,wide2,wide2-tm
ab WIDE KANDINSKY_FLASH=wgmma 30 rust-wgmma-kernels.log '^(attention|GPU_CHECK)' \
    --attention-only mma,wgmma,wgmma-tm
ab WIDE KANDINSKY_FLASH=wgmma-pipe 30 rust-wgmma-pipe-kernels.log '^(attention|GPU_CHECK)' \
    --attention-only wgmma-pipe,wgmma-pipe-tm
ab WIDE KANDINSKY_FLASH=wgmma-ns 30 rust-wgmma-ns-kernels.log '^(attention|GPU_CHECK)' \
    --attention-only wgmma-ns,wgmma-pipe-ns
ab WIDE KANDINSKY_FLASH=wide 60 rust-wide.log '^(unet|timings)' --timings-only --unet-only --quick
ab WIDE "KANDINSKY_FLASH=wide KANDINSKY_FLASH_TOKEN_MAJOR=1" 60 rust-wide-tm.log '^(unet|timings)' \
    --timings-only --unet-only --quick
ab WIDE KANDINSKY_FLASH=wgmma 60 rust-wgmma.log '^(unet|timings)' --timings-only --unet-only --quick
ab WIDE KANDINSKY_FLASH=wgmma-pipe 60 rust-wgmma-pipe.log '^(unet|timings)' --timings-only --unet-only --quick
# The one-kernel convolution GEMM (no f32 accumulator in memory): its rows against candle's
# conv2d and the cuBLAS path, then the UNet and MoVQ with it (speed and peak memory).
ab CONV_GEMM KANDINSKY_CONV_GEMM=mma 90 rust-conv-gemm-kernels.log '^(conv gemm|GPU_CHECK)' --conv-gemm-only
# The fused kernel with the least f16 time over the shapes it would run at (not "small"),
# among those whose rows all passed; the UNet and MoVQ are timed with that one.
GEMM_BEST=$(awk '
    /^conv gemm / && / FAIL/ { bad[$3] = 1 }
    /^conv gemm / && / F16: / && / PASS/ && !/ small / {
        split($0, a, "cublas ms"); split(a[2], v, "/"); ms[$3] += v[2]; n[$3]++
    }
    END {
        for (k in ms) if (n[k] > most) most = n[k]
        for (k in ms) if (!(k in bad) && n[k] == most && (best == "" || ms[k] < ms[best])) best = k
        print best
    }' "$OUT/rust-conv-gemm-kernels.log" 2>/dev/null)
echo "== fused convolution GEMM with the least time: ${GEMM_BEST:-none}"
if [ -n "$GEMM_BEST" ]; then
    ab CONV_GEMM KANDINSKY_CONV_GEMM=$GEMM_BEST 70 rust-conv-gemm.log '^(unet step|movq|timings)' \
        --timings-only --quick --no-text2img
fi
ab TOKEN_MAJOR KANDINSKY_FLASH_TOKEN_MAJOR=1 60 rust-token-major.log '^(unet|timings)' \
    --timings-only --unet-only --quick
ab CONV_NORM KANDINSKY_CONV_NORM=1 70 rust-conv-norm.log '^(unet step|movq|timings)' \
    --timings-only --quick --no-text2img
ab CONV_NORM "KANDINSKY_CONV_NORM=1 KANDINSKY_FLASH_TOKEN_MAJOR=1" 60 rust-both.log '^(unet|timings)' \
    --timings-only --unet-only --quick
ab CONV_NORM "KANDINSKY_CONV_NORM=1 KANDINSKY_FLASH_TOKEN_MAJOR=1" 60 rust-t2i-both.log '^(text2img|timings)' \
    --text2img-only
# ALL: every switch that won on its own, together — the best case the run can show for the
# UNet goal and the whole text2img. A switch wins when its 768 px UNet step (eager) beat the
# default's by 1 %; of the attention kernels, the fastest UNet among those whose kernel rows
# all passed (of the convolution GEMMs, the one the rows ranked first). Without measurements (parts skipped) ALL_ENV can be given.
ms_of() {  # the eager 768 px UNet step of a log, in ms ("" when absent)
    grep -hE '^unet step 768px b2 F16 ' "$OUT/$1" 2>/dev/null |
        awk '{for (i = 1; i < NF; i++) if ($(i + 1) == "ms,") { print $i; exit }}'
}
faster() { awk -v a="$1" -v b="$2" 'BEGIN { exit !(a != "" && b != "" && a < 0.99 * b) }'; }
if [ -z "${ALL_ENV:-}" ]; then
    base=$(ms_of rust.log)
    ALL_ENV="" best_ms=$base
    for kf in wide:rust-wide-kernels.log wgmma:rust-wgmma-kernels.log wgmma-pipe:rust-wgmma-pipe-kernels.log; do
        k=${kf%%:*} klog=${kf#*:}
        ms=$(ms_of "rust-$k.log")
        if grep -qE "^attention .* $k: .*PASS" "$OUT/$klog" 2>/dev/null &&
            ! grep -qE "^attention .* $k: .*FAIL" "$OUT/$klog" && faster "$ms" "$best_ms"; then
            best_ms=$ms ALL_ENV="KANDINSKY_FLASH=$k"
        fi
    done
    for sw in KANDINSKY_CONV_GEMM=${GEMM_BEST:-}:rust-conv-gemm.log \
        KANDINSKY_FLASH_TOKEN_MAJOR=1:rust-token-major.log KANDINSKY_CONV_NORM=1:rust-conv-norm.log; do
        faster "$(ms_of "${sw#*:}")" "$base" && ALL_ENV="$ALL_ENV ${sw%%:*}"
    done
    read -r -a parts <<<"$ALL_ENV"
    ALL_ENV="${parts[*]}"  # single spaces
    echo "== ALL: switches that won on their own (default UNet step ${base:-?} ms): ${ALL_ENV:-none}"
fi
if [ -z "$ALL_ENV" ]; then ALL=0; fi
ab ALL "$ALL_ENV" 60 rust-all.log '^(unet|timings)' --timings-only --unet-only --quick
ab ALL "$ALL_ENV" 60 rust-t2i-all.log '^(text2img|timings)' --text2img-only
ab BANDED KANDINSKY_CONV_SCRATCH_MB=64 70 rust-banded.log '^(movq|unet step 768px b2 F16 |timings)' \
    --timings-only --quick --no-text2img
ab PLAIN KANDINSKY_PLAIN_KERNELS=1 70 rust-plain.log '^(unet|timings)' --timings-only --unet-only --quick
if [ "${NCU:-1}" = 1 ]; then
    # Run 9 profiled the default path; NCU_ENV profiles it with switches set (e.g. the ones
    # that won above).
    echo "== ncu: kernels of one 768 px UNet step / MoVQ decode (f16) ${NCU_ENV:-}"
    NCU_BIN=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
    for w in unet movq; do
        # shellcheck disable=SC2086 # several assignments in one word
        env ${NCU_ENV:-} timeout $(t 75) "$NCU_BIN" --profile-from-start off --clock-control none --cache-control none \
            --metrics gpu__time_duration.sum --csv $BIN/gpu_check --profile $w \
            >"$OUT/ncu-$w.csv" 2>"$OUT/ncu-$w.err"; echo "ncu $w exit $?"
        python3 xtask/gpu/ncu_summary.py "$OUT/ncu-$w.csv" 16 2>&1 | tee "$OUT/ncu-$w.txt"
    done
fi
if [ "${DIFFUSERS:-0}" = 1 ]; then
    echo "== 4. diffusers"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
    export PYTHONPATH=/tmp/site
    python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)" | tee "$OUT/versions.txt"
    timeout $(t 150) python3 xtask/bench/diffusers_bench.py --device cuda --dtype fp16 --unet 64,96,128 --movq 512,768 \
        --prior --text --attn 96 --json "$OUT/diffusers-fp16.jsonl" 2>&1 | grep -v Warning | tee "$OUT/diffusers.log"
fi
echo "== rust table"
grep -A300 '^check' "$OUT/rust.log" | grep -v '^groupnorm'
# One line per switch and workload, so the switches that win are read off at once: the
# 768 px UNet step (eager and replayed), MoVQ at 768 px, the whole text2img, and the new
# attention kernels at the 48×48 level.
echo "== switches: log / row / value"
for f in "$OUT"/rust*.log; do
    grep -hE '^(unet step 768px b2 F16|movq decode 768px|text2img 768px|attention 48x48 h12 F16)' "$f" 2>/dev/null |
        sed "s|^|$(basename "$f" .log): |" | cut -c1-150
done
# Files that come back from the device are limited in number: one archive of every log.
(cd "$OUT" && tar czf logs.tgz --exclude=logs.tgz ./* && find . -type f ! -name logs.tgz -delete)
