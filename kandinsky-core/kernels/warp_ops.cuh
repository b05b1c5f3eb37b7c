// The warp-level hardware operations of the attention kernels, in one place: tensor-core
// mma.sync, ldmatrix, cp.async. Built with KANDINSKY_HOST_EMU, the same names come from
// xtask/gpu/emu/warp_emu.h instead, where host threads play the lanes, so the kernels' index
// arithmetic can be checked on a machine without a GPU (`bash xtask/gpu/emu/check.sh`).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#ifdef KANDINSKY_HOST_EMU
#include <warp_emu.h>
#else

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global → shared, zero-filled when `valid` is false (src-size 0).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// A 16-byte store to shared memory (its own name so that the host emulation can count its
// bank conflicts).
template <class V> __device__ __forceinline__ void st_shared16(V* p, const V& v) {
  static_assert(sizeof(V) == 16, "st_shared16 stores 16 bytes");
  *p = v;
}

// Four 8×8 matrices of 16-bit values: lane 8·j + r gives the address of row r of matrix j
// (16 contiguous bytes); lane 4·r + w receives word w of row r of matrix j in register j.
__device__ __forceinline__ void ldmatrix_x4(uint32_t* r, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
// The same, each matrix transposed: lane 4·r + w receives elements (2w, r) and (2w + 1, r).
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t* r, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// C[16 × 8] += A[16 × 16] · B[16 × 8] (mma.m16n8k16, f32 accumulation).
#define KD_MMA(TY)                                                                                           \
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." TY "." TY                                          \
               ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"                              \
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                                            \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1))
__device__ __forceinline__ void mma_f16(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) { KD_MMA("f16"); }
__device__ __forceinline__ void mma_bf16(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) { KD_MMA("bf16"); }
#undef KD_MMA

#endif  // KANDINSKY_HOST_EMU

// The storage type's side of mma.m16n8k16: packing two f32 into one register, rounding, and
// the product. bf16 keeps 8 significant bits, so the attention kernels split P into
// P_hi + P_lo for it (`split`).
template <typename T> struct Mma;
template <> struct Mma<__half> {
  static constexpr bool split = false;
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  __device__ __forceinline__ static float round(float v) { return __half2float(__float2half_rn(v)); }
  __device__ __forceinline__ static void mma(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
    mma_f16(c, a, b0, b1);
  }
};
template <> struct Mma<__nv_bfloat16> {
  static constexpr bool split = true;
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  __device__ __forceinline__ static float round(float v) {
    return __bfloat162float(__float2bfloat16_rn(v));
  }
  __device__ __forceinline__ static void mma(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
    mma_bf16(c, a, b0, b1);
  }
};
