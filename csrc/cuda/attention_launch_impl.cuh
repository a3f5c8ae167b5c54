// Definitions of attention_launch.cuh's launchers: which kernel runs for a problem, and its
// launch. Included only by the per-element-type translation units, which instantiate them
// with SKYLOOM_ATTENTION_LAUNCHERS.
//
// Forward, fp16/bf16, full and spatial modes, head_dim 64/128, sm_80+: the tensor-core kernels,
// flash::mma_forward_kernel (mma.sync, registers) where rows are 16-byte aligned, else
// flash::wmma_forward_kernel (WMMA, accumulator in shared memory). Backward, the same cases
// with aligned rows: flash::mma_grad_q_kernel and flash::mma_grad_kv_kernel. Everything else:
// the CUDA-core kernels of attention_kernels.cuh (docs/kernels.md).
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "cuda/attention_kernels.cuh"
#include "cuda/attention_launch.cuh"

namespace skyloom::cuda {
namespace {

// mma.sync and WMMA with bf16 need sm_80+, and the kernel's shared memory must fit.
bool tensor_cores_available(size_t smem_bytes) {
  int device = 0, major = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) return false;
  constexpr size_t kStatic = 128;  // the kernels' own __shared__ variables, padded
  return major >= 8 && shared_memory_fits(smem_bytes + kStatic);
}

}  // namespace

template <class T, int D>
void launch_attention_forward(DType dtype, const AttentionShape& shape, const AttentionOptions& options, Strided q,
                              Strided k, Strided v, StridedOut out, StridedOut lse, cudaStream_t stream) {
  using namespace flash;
  const Problem p = make_problem(shape, options);
  if (p.L == 0 || p.groups == 0 || shape.heads == 0) return;
  if constexpr (!std::is_same_v<T, float> && D >= 64) {
    if (options.mode != cpu::AttentionMode::kTemporal) {
      const bool aligned =
          rows_aligned(dtype, {{q.data, q.stride}, {k.data, k.stride}, {v.data, v.stride}, {out.data, out.stride}});
      if (aligned && tensor_cores_available(MmaTraits<T, D>::smem_bytes)) {
        const size_t smem = MmaTraits<T, D>::smem_bytes;
        launch_with_shared_memory(mma_forward_kernel<T, D>,
                                  row_blocks(p, MmaTraits<T, D>::kRows), 32 * kMmaWarps, smem, stream,
            p, static_cast<const T*>(q.data), strides_of(q.stride), static_cast<const T*>(k.data),
            strides_of(k.stride), static_cast<const T*>(v.data), strides_of(v.stride), static_cast<T*>(out.data),
            strides_of(out.stride), static_cast<float*>(lse.data), strides_of(lse.stride));
        return;
      }
      const size_t smem = WmmaSmem<T, D>::bytes;
      if (tensor_cores_available(smem)) {
        launch_with_shared_memory(wmma_forward_kernel<T, D>,
                                  row_blocks(p, kWmmaRows), 32 * kWmmaWarps, smem, stream,
            p, static_cast<const T*>(q.data), strides_of(q.stride), static_cast<const T*>(k.data),
            strides_of(k.stride), static_cast<const T*>(v.data), strides_of(v.stride), static_cast<T*>(out.data),
            strides_of(out.stride), static_cast<float*>(lse.data), strides_of(lse.stride));
        return;
      }
    }
  }
  forward_kernel<T, D><<<row_blocks(p, Core<D>::kRows), Core<D>::kThreads, 0, stream>>>(
      p, static_cast<const T*>(q.data), strides_of(q.stride), static_cast<const T*>(k.data), strides_of(k.stride),
      static_cast<const T*>(v.data), strides_of(v.stride), static_cast<T*>(out.data), strides_of(out.stride),
      static_cast<float*>(lse.data), strides_of(lse.stride));
}

template <class T, int D>
void launch_attention_backward(DType dtype, const AttentionShape& shape, const AttentionOptions& options,
                               Strided grad_out, Strided q, Strided k, Strided v, Strided out, Strided lse,
                               StridedOut grad_q, StridedOut grad_k, StridedOut grad_v, float* delta_workspace,
                               cudaStream_t stream) {
  using namespace flash;
  const Problem p = make_problem(shape, options);
  if (p.L == 0 || p.groups == 0 || shape.heads == 0) return;
  const Strides delta_strides{{shape.T * shape.S * shape.heads, shape.S * shape.heads, shape.heads, 1}};
  const T* go = static_cast<const T*>(grad_out.data);
  const T* qp = static_cast<const T*>(q.data);
  const T* kp = static_cast<const T*>(k.data);
  const T* vp = static_cast<const T*>(v.data);
  const float* lp = static_cast<const float*>(lse.data);
  const int64_t rows = p.L * shape.heads * p.groups;
  delta_kernel<T, D><<<unsigned((rows + 255) / 256), 256, 0, stream>>>(
      p, go, strides_of(grad_out.stride), static_cast<const T*>(out.data), strides_of(out.stride), delta_workspace,
      delta_strides, rows);
  if constexpr (!std::is_same_v<T, float> && D >= 64) {
    if (options.mode != cpu::AttentionMode::kTemporal &&
        tensor_cores_available(std::max(MmaBackwardTraits<T, D>::grad_q_smem,
                                        MmaBackwardTraits<T, D>::grad_kv_smem)) &&
        rows_aligned(dtype, {{grad_out.data, grad_out.stride}, {q.data, q.stride}, {k.data, k.stride},
                             {v.data, v.stride}, {grad_q.data, grad_q.stride}, {grad_k.data, grad_k.stride},
                             {grad_v.data, grad_v.stride}})) {
      using L = MmaBackwardTraits<T, D>;
      launch_with_shared_memory(mma_grad_q_kernel<T, D>,
                                row_blocks(p, L::kQueryRows), 32 * kMmaWarps, L::grad_q_smem, stream,
          p, go, strides_of(grad_out.stride), qp, strides_of(q.stride), kp, strides_of(k.stride), vp,
          strides_of(v.stride), lp, strides_of(lse.stride), delta_workspace, delta_strides,
          static_cast<T*>(grad_q.data), strides_of(grad_q.stride));
      launch_with_shared_memory(mma_grad_kv_kernel<T, D>,
                                row_blocks(p, L::kKeyRows), 32 * kMmaWarps, L::grad_kv_smem, stream,
          p, go, strides_of(grad_out.stride), qp, strides_of(q.stride), kp, strides_of(k.stride), vp,
          strides_of(v.stride), lp, strides_of(lse.stride), delta_workspace, delta_strides,
          static_cast<T*>(grad_k.data), strides_of(grad_k.stride), static_cast<T*>(grad_v.data),
          strides_of(grad_v.stride));
      return;
    }
  }
  grad_q_kernel<T, D><<<row_blocks(p, Core<D>::kRows), Core<D>::kThreads, 0, stream>>>(
      p, go, strides_of(grad_out.stride), qp, strides_of(q.stride), kp, strides_of(k.stride), vp,
      strides_of(v.stride), lp, strides_of(lse.stride), delta_workspace, delta_strides,
      static_cast<T*>(grad_q.data), strides_of(grad_q.stride));
  grad_kv_kernel<T, D><<<row_blocks(p, Core<D>::kKeyRows), Core<D>::kKeyThreads, 0, stream>>>(
      p, go, strides_of(grad_out.stride), qp, strides_of(q.stride), kp, strides_of(k.stride), vp,
      strides_of(v.stride), lp, strides_of(lse.stride), delta_workspace, delta_strides,
      static_cast<T*>(grad_k.data), strides_of(grad_k.stride), static_cast<T*>(grad_v.data),
      strides_of(grad_v.stride));
}

// Explicit instantiations for element type T at every CUDA head_dim.
#define SKYLOOM_ATTENTION_LAUNCHERS_AT(T, D)                                                                    \
  template void launch_attention_forward<T, D>(DType, const AttentionShape&, const AttentionOptions&, Strided,  \
                                               Strided, Strided, StridedOut, StridedOut, cudaStream_t);         \
  template void launch_attention_backward<T, D>(DType, const AttentionShape&, const AttentionOptions&, Strided, \
                                                Strided, Strided, Strided, Strided, Strided, StridedOut,        \
                                                StridedOut, StridedOut, float*, cudaStream_t);
#define SKYLOOM_ATTENTION_LAUNCHERS(T) \
  SKYLOOM_ATTENTION_LAUNCHERS_AT(T, 32) SKYLOOM_ATTENTION_LAUNCHERS_AT(T, 64) SKYLOOM_ATTENTION_LAUNCHERS_AT(T, 128)

}  // namespace skyloom::cuda
