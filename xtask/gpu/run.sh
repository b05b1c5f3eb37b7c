#!/usr/bin/env bash
# The prepared GPU run (on the device machine, from the repository root, carry
# [".gpu", ".whl"]; prepare both here with `bash xtask/gpu/build.sh`). Every part on takes
# longer than one device call: parts run in order of priority and each one's timeout is cut
# to what DEADLINE leaves, so the last ones (ncu, diffusers) are the first to go; VAR=0
# skips a part. Every part logs under $OUT:
#   1. CHECK: gpu_check: tiny-fixture parity on CUDA, every kernel against candle's plain
#      path, timings with peak pool memory;
#   2. the opt-in switches, each part skipped with its variable set to 0, in this order:
#      WIDE, the attention kernels (32 query rows per warp; Hopper's pipelined wgmma, the
#      default f16 kernel since run 10): their correctness and TFLOP/s beside the mma
#      kernel's (`gpu_check --attention-only`, own processes: a kernel fault poisons the
#      context), then the UNet with the fastest whose rows all passed (unless the default);
#      CONV_GEMM, the one-kernel convolution GEMMs (KANDINSKY_CONV_GEMM=mma, wgmma,
#      mma-1copy, wgmma-1copy): their rows, then the UNet and MoVQ with the fastest;
#      TRANSPOSE, the UNet without the attention blocks' tiled transposes
#      (KANDINSKY_TILED_TRANSPOSE=0; default since run 10); TOKEN_MAJOR, the UNet without the
#      token-major attention kernel (KANDINSKY_FLASH_TOKEN_MAJOR=0; default since run 10);
#      CONV_NORM, the UNet and MoVQ with the ResNet norms inside the convolutions' copy kernel (KANDINSKY_CONV_NORM=1); SUBPIXEL, the UNet and MoVQ
#      with the upsampling convolutions as four 2×2 phase convolutions
#      (KANDINSKY_CONV_SUBPIXEL=1); STATS, the UNet and MoVQ with the ResNets' conv1 leaving
#      norm2's GroupNorm statistics in its crop kernel (KANDINSKY_CONV_STATS=1); BOTH (only
#      with BOTH=1), the
#      UNet and the whole text2img with it and token-major; ALL, the UNet and the
#      text2img with every switch that won on its own (or ALL_ENV); BANDED, the timings with
#      those switches and the convolution scratch not banded (KANDINSKY_CONV_SCRATCH_MB=0:
#      what the per-network banding defaults of run 10 cost in time and save in memory), then
#      at each limit of SCRATCH_MBS;
#      PADDED_ROWS, the UNet and MoVQ with the convolution copies' rows at the padded width
#      (KANDINSKY_CONV_PADDED_ROWS=1, the layout of runs 6–9, against the narrow default); PLAIN,
#      the UNet with candle's own kernels (KANDINSKY_PLAIN_KERNELS=1, measured before: run
#      9; only with PLAIN=1);
#   3. ncu (NCU=0 skips it): the GPU time of every kernel of one 768 px UNet step and one
#      MoVQ decode, with the switches in NCU_ENV set;
#   4. with DIFFUSERS=1, diffusers/PyTorch on the same card (fp16), from the carried wheels.
# A switch joins ALL only if its 768 px UNet output's fingerprint agrees with the default's
# (part 1's, or a short BASE run where part 1 was skipped or cut short).
# Two calls fit a session's device time: `NCU=0 DEADLINE=560 bash xtask/gpu/run.sh` (107 s in
# run 10 without BANDED),
# then `CHECK=0 WIDE=0 CONV_GEMM=0 TRANSPOSE=0 TOKEN_MAJOR=0 CONV_NORM=0 SUBPIXEL=0 STATS=0 PADDED_ROWS=0 ALL_ENV="…"
# DIFFUSERS=1 DEADLINE=300 bash xtask/gpu/run.sh` with the first call's "== ALL" switches.
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
if [ "${CHECK:-1}" = 1 ]; then
    echo "== 1. kandinsky-rs gpu_check"
    timeout $(t 200) $BIN/gpu_check --quick >"$OUT/rust.log" 2>&1; echo "exit $?"
    grep -E '^(device|no CUDA|GPU_CHECK)' "$OUT/rust.log"
fi
# The default's 768 px UNet step and output fingerprint, which every switch is held against:
# from part 1's log, or, where part 1 was skipped (a second call) or cut short before its
# timings, from a short run of its own (BASE=0 skips it).
BASE_LOG=rust.log
if ! grep -qE '^unet output 768px b2 F16 fingerprint' "$OUT/rust.log" 2>/dev/null && [ "${BASE:-1}" = 1 ]; then
    echo "== default UNet step (the base the switches are held against)"
    timeout "$(t 60)" $BIN/gpu_check --timings-only --unet-only --quick >"$OUT/rust-base.log" 2>&1
    grep -E '^unet (step|output) 768px b2 F16' "$OUT/rust-base.log"
    BASE_LOG=rust-base.log
fi
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
ab WIDE KANDINSKY_FLASH=wgmma-pipe 30 rust-wgmma-pipe-kernels.log '^(attention|GPU_CHECK)' \
    --attention-only wgmma-pipe,wgmma-pipe-tm,wgmma-pipe-ns,wgmma-pipe-ns-tm
# The attention kernel with the least f16 time over the UNet's three levels, among those whose
# rows all passed (head-major rows; token-major is its own switch); the UNet is timed with it
# unless it is the default f16 kernel.
ATTN_BEST=$(cat "$OUT"/rust-w*-kernels.log 2>/dev/null | awk '
    /^attention / { k = $5; sub(/:$/, "", k) }
    /^attention / && / FAIL/ { bad[k] = 1 }
    /^attention / && / F16 / && / PASS/ && k !~ /-tm$/ && !seen[k, $2]++ {
        split($0, a, "plain ms"); split(a[2], v, "/"); ms[k] += v[2]; n[k]++
    }
    END {
        for (k in ms) if (n[k] > most) most = n[k]
        for (k in ms) if (!(k in bad) && n[k] == most && (best == "" || ms[k] < ms[best])) best = k
        print best
    }')
echo "== attention kernel with the least time: ${ATTN_BEST:-none}"
# wgmma-pipe is the default f16 kernel (run 10).
if [ -n "$ATTN_BEST" ] && [ "$ATTN_BEST" != wgmma-pipe ]; then
    ab WIDE KANDINSKY_FLASH=$ATTN_BEST 60 rust-attn.log '^(unet|timings)' --timings-only --unet-only --quick
fi
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
# The tiled transpose in the attention blocks (its rows against candle's are in part 1).
# The tiled transposes and the token-major attention are the default since run 10: these
# two measure the opt-outs (slower where the defaults still win; they never join ALL).
ab TRANSPOSE KANDINSKY_TILED_TRANSPOSE=0 60 rust-transpose.log '^(unet|timings)' \
    --timings-only --unet-only --quick
ab TOKEN_MAJOR KANDINSKY_FLASH_TOKEN_MAJOR=0 60 rust-token-major.log '^(unet|timings)' \
    --timings-only --unet-only --quick
ab CONV_NORM KANDINSKY_CONV_NORM=1 70 rust-conv-norm.log '^(unet step|movq|timings)' \
    --timings-only --quick --no-text2img
# The upsampling convolutions as four 2×2 phase convolutions of the low-resolution map (their
# rows against candle's are in part 1).
ab SUBPIXEL KANDINSKY_CONV_SUBPIXEL=1 70 rust-subpixel.log '^(unet step|movq|timings)' \
    --timings-only --quick --no-text2img
# The crop kernel of each ResNet's conv1 leaving norm2's statistics (their rows against
# candle's are in part 1).
ab STATS KANDINSKY_CONV_STATS=1 70 rust-stats.log '^(unet step|movq|timings)' \
    --timings-only --quick --no-text2img
# Session 7's pairing of the two (ALL below combines whatever won): only with BOTH=1.
BOTH=${BOTH:-0}
ab BOTH "KANDINSKY_CONV_NORM=1 KANDINSKY_FLASH_TOKEN_MAJOR=1" 60 rust-both.log '^(unet|timings)' \
    --timings-only --unet-only --quick
ab BOTH "KANDINSKY_CONV_NORM=1 KANDINSKY_FLASH_TOKEN_MAJOR=1" 60 rust-t2i-both.log '^(text2img|timings)' \
    --text2img-only
# ALL: every switch that won on its own, together — the best case the run can show for the
# UNet goal and the whole text2img. A switch wins when its 768 px UNet step (eager) beat the
# default's by 1 % (the attention kernel and the convolution GEMM being the ones their rows
# ranked first) and its output's fingerprint agrees with the default's. ALL_ENV can be given instead (e.g. from an earlier call's "== ALL" line, in
# a second call with the parts before it skipped: CHECK=0 WIDE=0 CONV_GEMM=0 ...).
ms_of() {  # the eager 768 px UNet step of a log, in ms ("" when absent)
    grep -hE '^unet step 768px b2 F16 ' "$OUT/$1" 2>/dev/null |
        awk '{for (i = 1; i < NF; i++) if ($(i + 1) == "ms,") { print $i; exit }}'
}
faster() { awk -v a="$1" -v b="$2" 'BEGIN { exit !(a != "" && b != "" && a < 0.99 * b) }'; }
# The 768 px UNet output's fingerprint (16 values; same seeded weights and inputs in every
# process) of a log, and its largest difference to the default's, relative to the largest
# value: about 1e-3 where only the rounding differs, O(1) for a path computing something else.
fp_of() { grep -hE '^unet output 768px b2 F16 fingerprint' "$OUT/$1" 2>/dev/null | awk '{ print $NF }' | head -1; }
fp_diff() {
    awk -v a="$1" -v b="$2" 'BEGIN {
        if (a == "" || b == "") { print "none"; exit }
        n = split(a, x, ","); split(b, y, ",")
        for (i = 1; i <= n; i++) { d = x[i] - y[i]; if (d < 0) d = -d; if (d > e) e = d
                                   m = y[i] < 0 ? -y[i] : y[i]; if (m > r) r = m }
        printf "%.1e\n", (r > 0 ? e / r : e) }'
}
# A switch's output agrees with the default's (2e-2: f16 rounding through one step).
same_output() { awk -v d="$(fp_diff "$1" "$2")" 'BEGIN { exit !(d != "none" && d + 0 <= 2e-2) }'; }
if [ -z "${ALL_ENV:-}" ]; then
    base=$(ms_of "$BASE_LOG")
    ALL_ENV=""
    for sw in KANDINSKY_FLASH=${ATTN_BEST:-}:rust-attn.log KANDINSKY_CONV_GEMM=${GEMM_BEST:-}:rust-conv-gemm.log \
        KANDINSKY_CONV_NORM=1:rust-conv-norm.log KANDINSKY_CONV_SUBPIXEL=1:rust-subpixel.log \
        KANDINSKY_CONV_STATS=1:rust-stats.log; do
        log=${sw#*:}
        [ -f "$OUT/$log" ] || continue
        echo "== ${sw%%:*}: UNet step $(ms_of "$log") ms, output vs default $(fp_diff "$(fp_of "$log")" "$(fp_of "$BASE_LOG")")"
        faster "$(ms_of "$log")" "$base" && same_output "$(fp_of "$log")" "$(fp_of "$BASE_LOG")" &&
            ALL_ENV="$ALL_ENV ${sw%%:*}"
    done
    read -r -a parts <<<"$ALL_ENV"
    ALL_ENV="${parts[*]}"  # single spaces
    echo "== ALL: switches that won on their own (default UNet step ${base:-?} ms): ${ALL_ENV:-none}"
fi
if [ -z "$ALL_ENV" ]; then ALL=0; fi
ab ALL "$ALL_ENV" 60 rust-all.log '^(unet|timings)' --timings-only --unet-only --quick
[ "${ALL:-1}" = 1 ] && echo "== ALL: output vs default $(fp_diff "$(fp_of rust-all.log)" "$(fp_of "$BASE_LOG")")"
ab ALL "$ALL_ENV" 60 rust-t2i-all.log '^(text2img|timings)' --text2img-only
# With ALL's switches and no banding: against part 1, what the banding defaults cost and save.
ab BANDED "KANDINSKY_CONV_SCRATCH_MB=0 $ALL_ENV" 70 rust-unbanded.log '^(movq|unet step 768px b2 F16 |timings)' \
    --timings-only --quick --no-text2img
# SCRATCH_MBS="96 160 256" (with BANDED=1): the banded scratch at other limits, the memory
# goal's trade-off between peak memory and time.
for mb in ${SCRATCH_MBS:-}; do
    ab BANDED "KANDINSKY_CONV_SCRATCH_MB=$mb $ALL_ENV" 40 "rust-banded-$mb.log" \
        '^(movq decode (768|1024)px|unet step (768|1024)px b2 F16 |timings)' --timings-only --quick --no-text2img
done
# The convolution copies' rows at the padded width, as runs 6–9 had them (the default now
# keeps only the output's columns): what the narrow rows gained.
ab PADDED_ROWS KANDINSKY_CONV_PADDED_ROWS=1 70 rust-padded-rows.log '^(unet step|movq|timings)' \
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
grep -A300 '^check' "$OUT/rust.log" 2>/dev/null | grep -v '^groupnorm'
# One line per switch and workload, so the switches that win are read off at once: the
# 768 px UNet step (eager and replayed), MoVQ at 768 px, the whole text2img, and the new
# attention kernels at the 48×48 level.
echo "== switches: log / row / value"
for f in "$OUT"/rust*.log; do
    grep -hE '^(unet step 768px b2 F16|unet output 768px|movq decode 768px|text2img 768px|attention 48x48 h12 F16)' "$f" 2>/dev/null |
        sed "s|^|$(basename "$f" .log): |" | cut -c1-150
done
# Files that come back from the device are limited in number: one archive of every log.
(cd "$OUT" && tar czf logs.tgz --exclude=logs.tgz ./* && find . -type f ! -name logs.tgz -delete)
