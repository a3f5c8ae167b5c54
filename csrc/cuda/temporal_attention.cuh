// Temporal-mode attention for short sequences (T <= kTemporalMaxFrames): several whole
// sequences per block, read with 16-byte loads straight from the (B, T, S, heads, head_dim)
// layout. attention.cu tries these first in temporal mode; each returns false, launching
// nothing, when the problem is not theirs (T too long, rows not 16-byte aligned, too little
// shared memory), and the general kernels run instead.
#pragma once

#include <cuda_runtime.h>

#include "cuda/kernels.h"

namespace skyloom::cuda {

constexpr int64_t kTemporalMaxFrames = 64;

bool temporal_attention_forward(DType dtype, const AttentionShape& shape, const AttentionOptions& options, Strided q,
                                Strided k, Strided v, StridedOut out, StridedOut lse, cudaStream_t stream);

bool temporal_attention_backward(DType dtype, const AttentionShape& shape, const AttentionOptions& options,
                                 Strided grad_out, Strided q, Strided k, Strided v, Strided out, Strided lse,
                                 StridedOut grad_q, StridedOut grad_k, StridedOut grad_v, cudaStream_t stream);

}  // namespace skyloom::cuda
