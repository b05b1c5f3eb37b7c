#!/usr/bin/env bash
# Prepare the one GPU run here, on the build machine (no GPU needed), from the repository
# root: `bash xtask/gpu/build.sh`, then on the device `bash xtask/gpu/run.sh` with
# carry [".gpu", ".whl"]. Builds two gpu_check binaries with ../shared/cuda's toolchain:
# .gpu/gpu_check (candle's CUDA backend: im2col convolutions) and .gpu/gpu_check_cudnn (the
# same with candle's cuDNN convolutions), both gzipped, copies gpu-env.sh, and downloads the diffusers
# wheel (+ importlib_metadata, zipp) that the device's torch venv lacks into .whl/.
set -euo pipefail
cd "$(dirname "$0")/../.."
CUDA_ENV=${CUDA_ENV:-$PWD/../.cuda-env}
[ -f "$CUDA_ENV/env.sh" ] || CUDA_ENV="$CUDA_ENV" bash ../shared/cuda/setup-cuda-toolchain.sh
# shellcheck disable=SC1091
source "$CUDA_ENV/env.sh" >/dev/null
# cuDNN: linked here against NVIDIA's wheel, loaded there from torch's venv (same major, 9).
"$CUDA_ENV/venv/bin/pip" install -q nvidia-cudnn-cu13
cudnn_lib=$(ls -d "$CUDA_ENV"/venv/lib/python3*/site-packages/nvidia/cudnn/lib | head -1)
mkdir -p "$CUDA_ENV/cudnn-link"
ln -sf "$cudnn_lib/libcudnn.so.9" "$CUDA_ENV/cudnn-link/libcudnn.so"
export LIBRARY_PATH="$CUDA_ENV/cudnn-link:${LIBRARY_PATH:-}"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target-cuda} CARGO_INCREMENTAL=0
mkdir -p .gpu .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >>.git/info/exclude
cargo build --release -p kandinsky-benches --features cuda --bin gpu_check
install -m 755 "$CARGO_TARGET_DIR/release/gpu_check" .gpu/gpu_check
cargo build --release -p kandinsky-benches --features cudnn --bin gpu_check
install -m 755 "$CARGO_TARGET_DIR/release/gpu_check" .gpu/gpu_check_cudnn
strip .gpu/gpu_check .gpu/gpu_check_cudnn
# Compressed: the tree that travels (tracked files + carried) is limited to 64 MiB.
gzip -9f .gpu/gpu_check .gpu/gpu_check_cudnn
cp ../shared/cuda/gpu-env.sh .gpu/
rm -f .whl/*.whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
    diffusers==0.42.1 importlib_metadata zipp
du -ch .gpu .whl | tail -1
ls -la .gpu .whl
