// Host emulation stand-in for CUDA's header: see warp_emu.h.
#pragma once
#include <warp_emu.h>
