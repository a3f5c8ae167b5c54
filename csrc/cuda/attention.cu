// Spacetime attention on the GPU, forward and backward: which kernels run, and their launches.
//
// Forward, fp16/bf16, full and spatial modes, head_dim 64/128, sm_80+: the tensor-core kernels,
// flash::mma_forward_kernel (mma.sync, registers) where rows are 16-byte aligned, else
// flash::wmma_forward_kernel (WMMA, accumulator in shared memory). Temporal mode with T <= 64
// and 16-byte-aligned rows: the short-sequence kernels of temporal_attention.cu. Everything
// else: the CUDA-core kernels of attention_kernels.cuh (docs/kernels.md).
#include <cstdint>
#include <type_traits>

#include "cuda/attention_kernels.cuh"
#include "cuda/temporal_attention.cuh"

namespace skyloom::cuda {
namespace {

using namespace flash;

// WMMA with bf16 needs sm_80+, and the kernel needs up to ~137 KB of shared memory per block.
bool tensor_cores_available() {
  int device = 0, major = 0, smem = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return false;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  return major >= 8 && size_t(smem) >= WmmaSmem<__nv_bfloat16, 128>::bytes;
}

}  // namespace

bool head_dim_supported(int64_t head_dim) { return head_dim == 32 || head_dim == 64 || head_dim == 128; }

void attention_forward(DType dtype, const AttentionShape& shape, const AttentionOptions& options, Strided q,
                       Strided k, Strided v, StridedOut out, StridedOut lse, cudaStream_t stream) {
  if (temporal_attention_forward(dtype, shape, options, q, k, v, out, lse, stream)) return;
  const Problem p = make_problem(shape, options);
  if (p.L == 0 || p.groups == 0 || shape.heads == 0) return;
  dispatch(dtype, shape.head_dim, [&](auto tag, auto dim) {
    using T = decltype(tag);
    constexpr int D = decltype(dim)::value;
    if constexpr (!std::is_same_v<T, float> && D >= 64) {
      if (options.mode != cpu::AttentionMode::kTemporal && tensor_cores_available()) {
        if (rows_aligned(dtype, {{q.data, q.stride}, {k.data, k.stride}, {v.data, v.stride}, {out.data, out.stride}})) {
          const size_t smem = MmaTraits<T, D>::smem_bytes;
          cudaFuncSetAttribute(mma_forward_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
          mma_forward_kernel<T, D><<<row_blocks(p, MmaTraits<T, D>::kRows), 32 * kMmaWarps, smem, stream>>>(
              p, static_cast<const T*>(q.data), strides_of(q.stride), static_cast<const T*>(k.data),
              strides_of(k.stride), static_cast<const T*>(v.data), strides_of(v.stride), static_cast<T*>(out.data),
              strides_of(out.stride), static_cast<float*>(lse.data), strides_of(lse.stride));
          return;
        }
        const size_t smem = WmmaSmem<T, D>::bytes;
        cudaFuncSetAttribute(wmma_forward_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
        wmma_forward_kernel<T, D><<<row_blocks(p, kWmmaRows), 32 * kWmmaWarps, smem, stream>>>(
            p, static_cast<const T*>(q.data), strides_of(q.stride), static_cast<const T*>(k.data),
            strides_of(k.stride), static_cast<const T*>(v.data), strides_of(v.stride), static_cast<T*>(out.data),
            strides_of(out.stride), static_cast<float*>(lse.data), strides_of(lse.stride));
        return;
      }
    }
    forward_kernel<T, D><<<row_blocks(p, kRows), kRows, 0, stream>>>(
        p, static_cast<const T*>(q.data), strides_of(q.stride), static_cast<const T*>(k.data), strides_of(k.stride),
        static_cast<const T*>(v.data), strides_of(v.stride), static_cast<T*>(out.data), strides_of(out.stride),
        static_cast<float*>(lse.data), strides_of(lse.stride));
  });
}

void attention_backward(DType dtype, const AttentionShape& shape, const AttentionOptions& options, Strided grad_out,
                        Strided q, Strided k, Strided v, Strided out, Strided lse, StridedOut grad_q,
                        StridedOut grad_k, StridedOut grad_v, float* delta_workspace, cudaStream_t stream) {
  if (temporal_attention_backward(dtype, shape, options, grad_out, q, k, v, out, lse, grad_q, grad_k, grad_v, stream))
    return;
  const Problem p = make_problem(shape, options);
  if (p.L == 0 || p.groups == 0 || shape.heads == 0) return;
  const Strides delta_strides{{shape.T * shape.S * shape.heads, shape.S * shape.heads, shape.heads, 1}};
  dispatch(dtype, shape.head_dim, [&](auto tag, auto dim) {
    using T = decltype(tag);
    constexpr int D = decltype(dim)::value;
    const T* go = static_cast<const T*>(grad_out.data);
    const T* qp = static_cast<const T*>(q.data);
    const T* kp = static_cast<const T*>(k.data);
    const T* vp = static_cast<const T*>(v.data);
    const float* lp = static_cast<const float*>(lse.data);
    const int64_t rows = p.L * shape.heads * p.groups;
    delta_kernel<T, D><<<unsigned((rows + 255) / 256), 256, 0, stream>>>(
        p, go, strides_of(grad_out.stride), static_cast<const T*>(out.data), strides_of(out.stride), delta_workspace,
        delta_strides, rows);
    grad_q_kernel<T, D><<<row_blocks(p, kRows), kRows, 0, stream>>>(
        p, go, strides_of(grad_out.stride), qp, strides_of(q.stride), kp, strides_of(k.stride), vp,
        strides_of(v.stride), lp, strides_of(lse.stride), delta_workspace, delta_strides,
        static_cast<T*>(grad_q.data), strides_of(grad_q.stride));
    grad_kv_kernel<T, D><<<row_blocks(p, kKeyRows), kKeyRows, 0, stream>>>(
        p, go, strides_of(grad_out.stride), qp, strides_of(q.stride), kp, strides_of(k.stride), vp,
        strides_of(v.stride), lp, strides_of(lse.stride), delta_workspace, delta_strides,
        static_cast<T*>(grad_k.data), strides_of(grad_k.stride), static_cast<T*>(grad_v.data),
        strides_of(grad_v.stride));
  });
}

}  // namespace skyloom::cuda
