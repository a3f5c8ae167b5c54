// What the CUDA attention kernels and their launchers share: float conversions of the element
// types, the exp2 constants of the online softmax, sums across the threads of a split row,
// the four element strides of a (B, T, S, heads, ·) operand passed by value to a kernel, and
// the launchers' checks (row alignment, shared memory, grid size), launch with dynamic shared
// memory and dtype/head_dim dispatch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "cpu/dtypes.h"

// Declares the block's dynamic shared memory as `unsigned char name[]`, 128-byte aligned
// (tests/cuda_emulation/emulate.h defines it as a pointer to its own buffer).
#ifndef SKYLOOM_DYNAMIC_SHARED_MEMORY
#define SKYLOOM_DYNAMIC_SHARED_MEMORY(name) extern __shared__ __align__(128) unsigned char name[]
#endif

namespace skyloom::cuda {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <class T> __device__ __forceinline__ float to_float(T x);
template <> __device__ __forceinline__ float to_float(float x) { return x; }
template <> __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <class T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float(float x) { return x; }
template <> __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }

// A row split between kRowThreads adjacent lanes (an aligned group of 1, 2, 4, 8, 16 or 32):
// row_lanes names them, and row_sum adds their shares. The mask holds just the row's lanes,
// since rows of one warp may run different trip counts under the causal mask.
template <int kRowThreads>
__device__ __forceinline__ unsigned row_lanes() {
  static_assert(kRowThreads >= 1 && kRowThreads <= 32 && (kRowThreads & (kRowThreads - 1)) == 0, "row threads");
  if constexpr (kRowThreads == 32) return 0xffffffffu;
  else return ((1u << kRowThreads) - 1) << ((threadIdx.x % 32) & ~(kRowThreads - 1));
}

template <int kRowThreads>
__device__ __forceinline__ float row_sum(float x, unsigned lanes) {
#pragma unroll
  for (int offset = 1; offset < kRowThreads; offset *= 2) x += __shfl_xor_sync(lanes, x, offset);
  return x;
}

struct Strides {
  int64_t s[4];
};

inline Strides strides_of(const int64_t s[4]) { return {{s[0], s[1], s[2], s[3]}}; }

// Whether a block's dynamic shared memory of `bytes` fits the current device's opt-in limit
// (99 KB on sm_86/89, 163 KB on sm_80, 227 KB on sm_90).
inline bool shared_memory_fits(size_t bytes) {
  int device = 0, optin = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) return false;
  return bytes <= size_t(optin);
}

// A launch's block count: grid.x holds at most 2^31 - 1 blocks.
inline unsigned grid_size(int64_t blocks) {
  if (blocks > 2147483647)
    throw std::invalid_argument("spacetime_attention (CUDA): the problem needs " + std::to_string(blocks) +
                                " thread blocks, over CUDA's 2^31 - 1; split the batch");
  return unsigned(blocks);
}

// A (B, T, S, heads, head_dim) operand as the launchers check it.
struct Operand {
  const void* data;
  const int64_t* stride;
};

inline int64_t element_size_of(DType dtype) { return dtype == DType::kFloat32 ? 4 : 2; }

// 16-byte loads and stores need every row start of every operand 16-byte aligned: the base
// pointer and all four strides (head_dim is unit-stride, as the bindings guarantee).
inline bool rows_aligned(DType dtype, std::initializer_list<Operand> operands) {
  for (const Operand& o : operands) {
    if (reinterpret_cast<uintptr_t>(o.data) % 16 != 0) return false;
    for (int i = 0; i < 4; ++i)
      if ((o.stride[i] * element_size_of(dtype)) % 16 != 0) return false;
  }
  return true;
}

#if defined(__CUDACC__)
// kernel<<<blocks, threads, smem, stream>>>(args...), opting the kernel in to `smem` bytes of
// dynamic shared memory first: past 48 KB a kernel must ask (the launcher has checked the
// device has them, shared_memory_fits).
template <class... Params, class... Args>
void launch_with_shared_memory(void (*kernel)(Params...), unsigned blocks, int threads, size_t smem,
                               cudaStream_t stream, Args... args) {
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  kernel<<<blocks, threads, smem, stream>>>(args...);
}
#endif

// Runtime dtype and head_dim to template arguments (flash-attention's static_switch idea).
template <class Fn>
auto dispatch(DType dtype, int64_t head_dim, Fn&& fn) {
  auto with_dim = [&](auto tag) {
    using T = decltype(tag);
    switch (head_dim) {
      case 32: return fn(T{}, std::integral_constant<int, 32>{});
      case 64: return fn(T{}, std::integral_constant<int, 64>{});
      case 128: return fn(T{}, std::integral_constant<int, 128>{});
      default: throw std::invalid_argument("spacetime_attention (CUDA): head_dim must be 32, 64 or 128");
    }
  };
  switch (dtype) {
    case DType::kFloat32: return with_dim(float{});
    case DType::kFloat16: return with_dim(__half{});
    case DType::kBFloat16: return with_dim(__nv_bfloat16{});
    default: throw std::invalid_argument("spacetime_attention (CUDA): dtype must be float32, float16 or bfloat16");
  }
}

}  // namespace skyloom::cuda
