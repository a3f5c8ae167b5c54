// CUDA implementations of the torch.ops.skyloom ops (schemas in bindings/ops.cpp). Compiled
// only when SKYLOOM_CUDA is on: this is the one file that sees both torch's CUDA headers
// and the torch-free launchers in csrc/cuda.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/kernels.h"
#include "op_checks.h"

namespace skyloom::bindings {
namespace {

void check_cuda_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.scalar_type() != at::kDouble, name, " is float64: the CUDA kernels take float32, float16 or bfloat16");
}

at::Tensor patchify_cuda(const at::Tensor& x, at::IntArrayRef patch_size) {
  const cpu::PatchGeometry g = check_patchify(x, patch_size);
  check_cuda_float(x, "patchify: x");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = (g.T / g.pt) * (g.H / g.ph) * (g.W / g.pw), F = g.C * g.pt * g.ph * g.pw;
  at::Tensor tokens = at::empty({g.B, N, F}, x.options());
  if (tokens.numel() == 0) return tokens;
  const int64_t strides[5] = {x.stride(0), x.stride(1), x.stride(2), x.stride(3), x.stride(4)};
  cuda::patchify(x.data_ptr(), strides, tokens.data_ptr(), g, x.element_size(), c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return tokens;
}

at::Tensor unpatchify_cuda(const at::Tensor& tokens, at::IntArrayRef patch_size, at::IntArrayRef grid) {
  const cpu::PatchGeometry g = check_unpatchify(tokens, patch_size, grid);
  check_cuda_float(tokens, "unpatchify: tokens");
  const c10::cuda::CUDAGuard guard(tokens.device());
  at::Tensor video = at::empty({g.B, g.C, g.T, g.H, g.W}, tokens.options());
  if (video.numel() == 0) return video;
  const int64_t strides[3] = {tokens.stride(0), tokens.stride(1), tokens.stride(2)};
  cuda::unpatchify(tokens.data_ptr(), strides, video.data_ptr(), g, tokens.element_size(),
                   c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return video;
}

std::tuple<at::Tensor, at::Tensor> attention_forward_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                          const at::Tensor& v_in, const std::string& mode,
                                                          bool causal, double scale,
                                                          const c10::optional<at::Tensor>& valid_lengths) {
  const cpu::AttentionShape shape = check_attention({{&q_in, "q"}, {&k_in, "k"}, {&v_in, "v"}}, valid_lengths, mode);
  check_cuda_float(q_in, "spacetime_attention: q");
  TORCH_CHECK(cuda::head_dim_supported(shape.head_dim), "spacetime_attention: head_dim ", shape.head_dim,
              " is not supported on CUDA; use 32, 64 or 128");
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = unit_last_stride(q_in), k = unit_last_stride(k_in), v = unit_last_stride(v_in);
  at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::empty({shape.B, shape.T, shape.S, shape.heads}, q.options().dtype(at::kFloat));
  const at::Tensor valid = valid_lengths ? valid_lengths->contiguous() : at::Tensor();
  cuda::attention_forward(dtype_of(q, "q"), shape, attention_options(mode, causal, scale, valid_lengths ? &valid : nullptr),
                          strided(q), strided(k), strided(v), strided_out(out), strided_out(lse),
                          c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse, const std::string& mode, bool causal, double scale,
    const c10::optional<at::Tensor>& valid_lengths) {
  const cpu::AttentionShape shape = check_attention(
      {{&q_in, "q"}, {&k_in, "k"}, {&v_in, "v"}, {&out_in, "out"}, {&grad_out_in, "grad_out"}}, valid_lengths, mode);
  check_cuda_float(q_in, "spacetime_attention: q");
  TORCH_CHECK(cuda::head_dim_supported(shape.head_dim), "spacetime_attention: head_dim ", shape.head_dim,
              " is not supported on CUDA; use 32, 64 or 128");
  TORCH_CHECK(lse.dim() == 4 && lse.size(0) == shape.B && lse.size(1) == shape.T && lse.size(2) == shape.S &&
                  lse.size(3) == shape.heads && lse.scalar_type() == at::kFloat && lse.is_cuda(),
              "spacetime_attention backward: lse must be (B, T, S, heads) float32 on CUDA, got ", lse.sizes());
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = unit_last_stride(q_in), k = unit_last_stride(k_in), v = unit_last_stride(v_in),
                   out = unit_last_stride(out_in), grad_out = unit_last_stride(grad_out_in);
  const auto contiguous = q.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor grad_q = at::empty(q.sizes(), contiguous), grad_k = at::empty(q.sizes(), contiguous),
             grad_v = at::empty(q.sizes(), contiguous);
  at::Tensor delta = at::empty({shape.B, shape.T, shape.S, shape.heads}, q.options().dtype(at::kFloat));
  const at::Tensor valid = valid_lengths ? valid_lengths->contiguous() : at::Tensor();
  cuda::attention_backward(dtype_of(q, "q"), shape,
                           attention_options(mode, causal, scale, valid_lengths ? &valid : nullptr), strided(grad_out),
                           strided(q), strided(k), strided(v), strided(out), strided(lse), strided_out(grad_q),
                           strided_out(grad_k), strided_out(grad_v), delta.data_ptr<float>(),
                           c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {grad_q, grad_k, grad_v};
}

}  // namespace
}  // namespace skyloom::bindings

TORCH_LIBRARY_IMPL(skyloom, CUDA, m) {
  m.impl("patchify", &skyloom::bindings::patchify_cuda);
  m.impl("unpatchify", &skyloom::bindings::unpatchify_cuda);
  m.impl("spacetime_attention_forward", &skyloom::bindings::attention_forward_cuda);
  m.impl("spacetime_attention_backward", &skyloom::bindings::attention_backward_cuda);
}
