// Spacetime attention on the GPU, forward and backward: the short-T temporal kernels where
// they take the problem (temporal_attention.cu), else the launchers for the dtype and head_dim
// (attention_launch_impl.cuh, compiled per element type; docs/kernels.md).
#include <cstdint>

#include "cuda/attention_common.cuh"
#include "cuda/attention_launch.cuh"
#include "cuda/temporal_attention.cuh"

namespace skyloom::cuda {

bool head_dim_supported(int64_t head_dim) { return head_dim == 32 || head_dim == 64 || head_dim == 128; }

void attention_forward(DType dtype, const AttentionShape& shape, const AttentionOptions& options, Strided q,
                       Strided k, Strided v, StridedOut out, StridedOut lse, cudaStream_t stream) {
  if (temporal_attention_forward(dtype, shape, options, q, k, v, out, lse, stream)) return;
  dispatch(dtype, shape.head_dim, [&](auto tag, auto dim) {
    launch_attention_forward<decltype(tag), decltype(dim)::value>(dtype, shape, options, q, k, v, out, lse, stream);
  });
}

void attention_backward(DType dtype, const AttentionShape& shape, const AttentionOptions& options, Strided grad_out,
                        Strided q, Strided k, Strided v, Strided out, Strided lse, StridedOut grad_q,
                        StridedOut grad_k, StridedOut grad_v, float* delta_workspace, cudaStream_t stream) {
  if (temporal_attention_backward(dtype, shape, options, grad_out, q, k, v, out, lse, grad_q, grad_k, grad_v, stream))
    return;
  dispatch(dtype, shape.head_dim, [&](auto tag, auto dim) {
    launch_attention_backward<decltype(tag), decltype(dim)::value>(dtype, shape, options, grad_out, q, k, v, out, lse,
                                                                   grad_q, grad_k, grad_v, delta_workspace, stream);
  });
}

}  // namespace skyloom::cuda
