// Launchers of the short-T temporal attention kernels (temporal_attention_kernels.cuh): they
// take a problem only when its rows allow 16-byte accesses and the block's shared memory fits.
#include <cstdint>

#include "cuda/temporal_attention_kernels.cuh"

namespace skyloom::cuda {
namespace {

using temporal::RowSlice;
using temporal::TemporalProblem;

// Whether the short-T kernels take this problem: temporal mode, 1 <= T <= kTemporalMaxFrames,
// a CUDA head_dim, the block's shared memory available, and every operand's rows aligned.
bool takes(DType dtype, const AttentionShape& shape, const AttentionOptions& options, size_t smem,
           std::initializer_list<Operand> operands) {
  if (options.mode != cpu::AttentionMode::kTemporal || shape.T < 1 || shape.T > kTemporalMaxFrames ||
      !head_dim_supported(shape.head_dim) || !shared_memory_fits(smem))
    return false;
  return rows_aligned(dtype, operands);
}

}  // namespace

bool temporal_attention_forward(DType dtype, const AttentionShape& shape, const AttentionOptions& options, Strided q,
                                Strided k, Strided v, StridedOut out, StridedOut lse, cudaStream_t stream) {
  const size_t smem = temporal::forward_smem(element_size_of(dtype), shape.head_dim, shape.T);
  if (!takes(dtype, shape, options, smem, {{q.data, q.stride}, {k.data, k.stride}, {v.data, v.stride},
                                           {out.data, out.stride}}))
    return false;
  const TemporalProblem p = temporal::make_problem(shape, options);
  if (p.sequences == 0) return true;
  dispatch(dtype, shape.head_dim, [&](auto tag, auto dim) {
    using T = decltype(tag);
    constexpr int D = decltype(dim)::value;
    launch_with_shared_memory(temporal::forward_kernel<T, D>,
                              temporal::block_count(p), RowSlice<T, D>::kThreads, smem, stream,
        p, static_cast<const T*>(q.data), strides_of(q.stride), static_cast<const T*>(k.data), strides_of(k.stride),
        static_cast<const T*>(v.data), strides_of(v.stride), static_cast<T*>(out.data), strides_of(out.stride),
        static_cast<float*>(lse.data), strides_of(lse.stride));
  });
  return true;
}

bool temporal_attention_backward(DType dtype, const AttentionShape& shape, const AttentionOptions& options,
                                 Strided grad_out, Strided q, Strided k, Strided v, Strided out, Strided lse,
                                 StridedOut grad_q, StridedOut grad_k, StridedOut grad_v, cudaStream_t stream) {
  const size_t smem = temporal::backward_smem(element_size_of(dtype), shape.head_dim);
  if (!takes(dtype, shape, options, smem,
             {{grad_out.data, grad_out.stride}, {q.data, q.stride}, {k.data, k.stride}, {v.data, v.stride},
              {out.data, out.stride}, {grad_q.data, grad_q.stride}, {grad_k.data, grad_k.stride},
              {grad_v.data, grad_v.stride}}))
    return false;
  const TemporalProblem p = temporal::make_problem(shape, options);
  if (p.sequences == 0) return true;
  dispatch(dtype, shape.head_dim, [&](auto tag, auto dim) {
    using T = decltype(tag);
    constexpr int D = decltype(dim)::value;
    launch_with_shared_memory(temporal::backward_kernel<T, D>,
                              temporal::block_count(p), RowSlice<T, D>::kThreads, smem, stream,
        p, static_cast<const T*>(grad_out.data), strides_of(grad_out.stride), static_cast<const T*>(q.data),
        strides_of(q.stride), static_cast<const T*>(k.data), strides_of(k.stride), static_cast<const T*>(v.data),
        strides_of(v.stride), static_cast<const T*>(out.data), strides_of(out.stride),
        static_cast<const float*>(lse.data), strides_of(lse.stride), static_cast<T*>(grad_q.data),
        strides_of(grad_q.stride), static_cast<T*>(grad_k.data), strides_of(grad_k.stride),
        static_cast<T*>(grad_v.data), strides_of(grad_v.stride));
  });
  return true;
}

}  // namespace skyloom::cuda
