// Hopper's warpgroup-level tensor-core operations (sm_90a): wgmma.mma_async with A in
// registers and B in shared memory (through a matrix descriptor), its fences, and the proxy
// fence that makes cp.async writes visible to it. Only flash_attention_wgmma.cu includes
// this. With KANDINSKY_HOST_EMU the same names come from xtask/gpu/emu/warp_emu.h.
//
// Shared-memory operands use the canonical layouts of the PTX ISA ("matrix descriptor",
// "canonical layouts"), with T = 8 two-byte elements per 16 bytes:
//   no swizzle, K-major  ((8,m),(T,2k)):((T,SBO),(1,LBO))   — 8 × 16-byte core matrices of
//   no swizzle, MN-major ((T,1,m),(8,k)):((1,T,SBO),(T,LBO))  128 contiguous bytes;
//   128-byte swizzle, K-major  ((8,m),(T,2k)):((8T,SBO),(1,T)) — rows of 128 bytes, whose
//   128-byte swizzle, MN-major ((T,8,m),(8,k)):((1,T,LBO),(8T,SBO)) 16-byte chunks are XORed
// with the row's index within its 1024-byte block (address bits [4, 7) ^= bits [7, 10), on
// the absolute shared-memory address: a descriptor may start 32 bytes into a row).
#pragma once
#include "warp_ops.cuh"

#ifndef KANDINSKY_HOST_EMU

// Descriptor of an operand starting at `p` (16-byte aligned) in shared memory; `sw128`: the
// 128-byte swizzle (its 1024-byte blocks aligned, so the base-offset field stays 0).
__device__ __forceinline__ uint64_t wgmma_desc(const void* p, uint32_t lbo, uint32_t sbo, bool sw128) {
  return (uint64_t)((smem_addr(p) & 0x3FFFF) >> 4) | ((uint64_t)((lbo & 0x3FFFF) >> 4) << 16) |
         ((uint64_t)((sbo & 0x3FFFF) >> 4) << 32) | ((uint64_t)(sw128 ? 1 : 0) << 62);
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// cp.async writes shared memory through the generic proxy, wgmma reads it through the async
// proxy: each thread fences after its copies have landed, before the block barrier.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
// Keeps the compiler from moving accesses to an accumulator across an asynchronous wgmma,
// or reusing an A operand's registers before the wgmma reading them is waited for.
__device__ __forceinline__ void wgmma_fence_operand(float& r) { asm volatile("" : "+f"(r)::"memory"); }
__device__ __forceinline__ void wgmma_fence_operand(uint32_t& r) { asm volatile("" : "+r"(r)::"memory"); }

#define KD_WGMMA_D32                                                                                       \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, " \
  "%22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define KD_WGMMA_OUTS(d)                                                                                   \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),         \
      "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
      "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]),          \
      "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]),          \
      "+f"(d[30]), "+f"(d[31])
#define KD_WGMMA(TY, TRANS)                                                                              \
  asm volatile(                                                                                          \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                                                       \
      "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " " KD_WGMMA_D32                           \
      ", {%32, %33, %34, %35}, %36, p, 1, 1, " TRANS ";\n}\n"                                            \
      : KD_WGMMA_OUTS(d)                                                                                 \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(scale_d))

// D[64 × 64] = A[64 × 16] · B[16 × 64] (+ D when scale_d != 0), f32 accumulation. A in
// registers (warp w of the warpgroup holds rows 16w.. as mma.m16n8k16's A fragment), D as
// 8 of mma.m16n8k16's C fragments (n8 block j in d[4j .. 4j + 3]). B through `desc`:
// K-major (TRANS_B = 0) or N-major (1).
template <bool BF16, int TRANS_B>
__device__ __forceinline__ void wgmma_m64n64k16_rs(float* d, const uint32_t* a, uint64_t desc, int scale_d) {
  if constexpr (BF16) {
    if constexpr (TRANS_B) KD_WGMMA("bf16", "1");
    else KD_WGMMA("bf16", "0");
  } else {
    if constexpr (TRANS_B) KD_WGMMA("f16", "1");
    else KD_WGMMA("f16", "0");
  }
}
#undef KD_WGMMA
#undef KD_WGMMA_OUTS
#undef KD_WGMMA_D32

#endif  // KANDINSKY_HOST_EMU
