#!/usr/bin/env bash
# Check the attention kernels' index arithmetic on the CPU: compile kandinsky-core/kernels'
# flash_attention_{mma,wide,wgmma}.cu for the host against warp_emu.h (lanes as host threads) and
# compare them with attention in double precision. Needs g++ ≥ 12 (C++20, _Float16).
# Arguments pick kernels (mma, wide4, wide2, wgmma, wgmma-ns, wgmma-pipe, wgmma-pipe-ns); the default is all.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
kernels=$here/../../../kandinsky-core/kernels
bin=${TMPDIR:-/tmp}/kandinsky-warp-emu-$$
trap 'rm -f "$bin"' EXIT
g++ -std=c++20 -O2 -pthread ${EMU_CXXFLAGS:-} -fno-strict-aliasing -DKANDINSKY_HOST_EMU \
  -I "$here" -I "$kernels" -o "$bin" "$here/check.cpp"
"$bin" "$@"
