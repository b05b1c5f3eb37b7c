#!/usr/bin/env bash
# Check CUDA kernels' index arithmetic on the CPU: compile kandinsky-core/kernels'
# flash_attention_{mma,wide,wgmma}.cu for the host against warp_emu.h (lanes as host threads)
# and compare them with attention in double precision (check.cpp), then the normalise-on-read
# convolution copy of conv.cu against the plain copy of a map normalised in double and the
# crop kernel against its definition (check_conv.cpp), the one-kernel convolution GEMMs of conv_gemm{,_wgmma}.cu against a
# convolution in double (check_conv_gemm.cpp), and the tiled transpose of transpose.cu
# against its definition (check_transpose.cpp). Needs g++ ≥ 12 (C++20, _Float16). Arguments
# pick attention kernels (mma, wide4, wide2, wgmma, wgmma-ns, wgmma-pipe, wgmma-pipe-ns) and
# skip the convolution checks; the default is everything.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
kernels=$here/../../../kandinsky-core/kernels
bin=${TMPDIR:-/tmp}/kandinsky-warp-emu-$$
trap 'rm -f "$bin" "$bin-conv" "$bin-gemm" "$bin-transpose"' EXIT
build() {
  # shellcheck disable=SC2086 # EMU_CXXFLAGS: several flags (e.g. -fsanitize=address)
  g++ -std=c++20 -O2 -pthread ${EMU_CXXFLAGS:-} -fno-strict-aliasing -DKANDINSKY_HOST_EMU \
    -I "$here" -I "$kernels" -o "$1" "$2"
}
build "$bin" "$here/check.cpp"
status=0
"$bin" "$@" || status=1
if [ $# -eq 0 ]; then
  build "$bin-conv" "$here/check_conv.cpp"
  "$bin-conv" || status=1
  build "$bin-gemm" "$here/check_conv_gemm.cpp"
  "$bin-gemm" || status=1
  build "$bin-transpose" "$here/check_transpose.cpp"
  "$bin-transpose" || status=1
fi
exit $status
