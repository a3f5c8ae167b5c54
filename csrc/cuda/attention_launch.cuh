// The launches of the general and tensor-core attention kernels for one element type and
// head_dim (attention.cu picks them at run time). Each element type's are compiled in a
// translation unit of its own (attention_float.cu, attention_half.cu, attention_bfloat16.cu),
// so the three compile in parallel.
#pragma once

#include <cuda_runtime.h>

#include "cuda/kernels.h"

namespace skyloom::cuda {

template <class T, int D>
void launch_attention_forward(DType dtype, const AttentionShape& shape, const AttentionOptions& options, Strided q,
                              Strided k, Strided v, StridedOut out, StridedOut lse, cudaStream_t stream);

template <class T, int D>
void launch_attention_backward(DType dtype, const AttentionShape& shape, const AttentionOptions& options,
                               Strided grad_out, Strided q, Strided k, Strided v, Strided out, Strided lse,
                               StridedOut grad_q, StridedOut grad_k, StridedOut grad_v, float* delta_workspace,
                               cudaStream_t stream);

}  // namespace skyloom::cuda
