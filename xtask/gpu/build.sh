#!/usr/bin/env bash
# Prepare the one GPU run here, on the build machine (no GPU needed), from the repository
# root: `bash xtask/gpu/build.sh`, then on the device `bash xtask/gpu/run.sh` with
# carry [".gpu", ".whl"]. Builds .gpu/gpu_check (gzipped) with ../shared/cuda's toolchain,
# copies gpu-env.sh, and downloads the diffusers wheel (+ importlib_metadata, zipp) that the
# device's torch venv lacks into .whl/. (`--features cudnn` still builds, for users; GPU run
# 5 measured candle's cuDNN convolutions at 11 TFLOP/s, so the run no longer carries them.)
set -euo pipefail
cd "$(dirname "$0")/../.."
CUDA_ENV=${CUDA_ENV:-$PWD/../.cuda-env}
[ -f "$CUDA_ENV/env.sh" ] || CUDA_ENV="$CUDA_ENV" bash ../shared/cuda/setup-cuda-toolchain.sh
# shellcheck disable=SC1091
source "$CUDA_ENV/env.sh" >/dev/null
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target-cuda} CARGO_INCREMENTAL=0
mkdir -p .gpu .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >>.git/info/exclude
rm -f .gpu/gpu_check_cudnn.gz
cargo build --release -p kandinsky-benches --features cuda --bin gpu_check
install -m 755 "$CARGO_TARGET_DIR/release/gpu_check" .gpu/gpu_check
strip .gpu/gpu_check
# Compressed: the tree that travels (tracked files + carried) is limited to 64 MiB.
gzip -9f .gpu/gpu_check
cp ../shared/cuda/gpu-env.sh .gpu/
rm -f .whl/*.whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
    diffusers==0.42.1 importlib_metadata zipp
du -ch .gpu .whl | tail -1
ls -la .gpu .whl
