// The torch.ops.skyloom schemas (defined once, here) and their CPU implementations.
// Fake (meta) implementations and autograd are registered from Python in skyloom.ops.
#include <ATen/ATen.h>
#include <torch/library.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif
#include <cstdint>

#include "op_checks.h"

namespace skyloom::bindings {
namespace {

// A large CPU tensor is usually fresh memory from mmap, and the first write to each 4 KiB page
// faults: on the VMs we measured, a fresh 32 MiB output cost 7.5 ms of faults, more than the
// temporal kernel's own work (docs/performance.md). Asking the kernel for 2 MiB pages on the
// buffer's aligned interior makes that 16 faults instead of 8,192. It is a hint: where huge pages
// are off nothing changes, and pages a reused buffer already holds stay as they are.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor out = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t(2) << 20;
  if (out.is_cpu() && out.nbytes() >= 2 * kHugePage) {
    const uintptr_t start = reinterpret_cast<uintptr_t>(out.data_ptr());
    const uintptr_t begin = (start + kHugePage - 1) & ~(kHugePage - 1), end = (start + out.nbytes()) & ~(kHugePage - 1);
    if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
  }
#endif
  return out;
}

at::Tensor patchify_cpu(const at::Tensor& x, at::IntArrayRef patch_size) {
  const cpu::PatchGeometry g = check_patchify(x, patch_size);
  const int64_t N = (g.T / g.pt) * (g.H / g.ph) * (g.W / g.pw), F = g.C * g.pt * g.ph * g.pw;
  at::Tensor tokens = empty_output({g.B, N, F}, x.options());
  if (tokens.numel() == 0) return tokens;
  const int64_t strides[5] = {x.stride(0), x.stride(1), x.stride(2), x.stride(3), x.stride(4)};
  cpu::patchify(x.data_ptr(), strides, tokens.data_ptr(), g, x.element_size());
  return tokens;
}

at::Tensor unpatchify_cpu(const at::Tensor& tokens, at::IntArrayRef patch_size, at::IntArrayRef grid) {
  const cpu::PatchGeometry g = check_unpatchify(tokens, patch_size, grid);
  at::Tensor video = empty_output({g.B, g.C, g.T, g.H, g.W}, tokens.options());
  if (video.numel() == 0) return video;
  const int64_t strides[3] = {tokens.stride(0), tokens.stride(1), tokens.stride(2)};
  cpu::unpatchify(tokens.data_ptr(), strides, video.data_ptr(), g, tokens.element_size());
  return video;
}

std::tuple<at::Tensor, at::Tensor> attention_forward_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                         const at::Tensor& v_in, const std::string& mode, bool causal,
                                                         double scale, const c10::optional<at::Tensor>& valid_lengths) {
  const cpu::AttentionShape shape = check_attention({{&q_in, "q"}, {&k_in, "k"}, {&v_in, "v"}}, valid_lengths, mode);
  const at::Tensor q = unit_last_stride(q_in), k = unit_last_stride(k_in), v = unit_last_stride(v_in);
  at::Tensor out = empty_output(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::empty({shape.B, shape.T, shape.S, shape.heads}, q.options().dtype(lse_dtype(q)));
  const at::Tensor valid = valid_lengths ? valid_lengths->contiguous() : at::Tensor();
  cpu::attention_forward(dtype_of(q, "q"), shape, attention_options(mode, causal, scale, valid_lengths ? &valid : nullptr),
                         strided(q), strided(k), strided(v), strided_out(out), strided_out(lse));
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse, const std::string& mode, bool causal, double scale,
    const c10::optional<at::Tensor>& valid_lengths) {
  const cpu::AttentionShape shape = check_attention(
      {{&q_in, "q"}, {&k_in, "k"}, {&v_in, "v"}, {&out_in, "out"}, {&grad_out_in, "grad_out"}}, valid_lengths, mode);
  TORCH_CHECK(lse.dim() == 4 && lse.size(0) == shape.B && lse.size(1) == shape.T && lse.size(2) == shape.S &&
                  lse.size(3) == shape.heads && lse.scalar_type() == lse_dtype(q_in),
              "spacetime_attention backward: lse must be (B, T, S, heads) ", lse_dtype(q_in), ", got ", lse.sizes(),
              " ", lse.scalar_type());
  const at::Tensor q = unit_last_stride(q_in), k = unit_last_stride(k_in), v = unit_last_stride(v_in),
                   out = unit_last_stride(out_in), grad_out = unit_last_stride(grad_out_in);
  const auto contiguous = q.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor grad_q = empty_output(q.sizes(), contiguous), grad_k = empty_output(q.sizes(), contiguous),
             grad_v = empty_output(q.sizes(), contiguous);
  const at::Tensor valid = valid_lengths ? valid_lengths->contiguous() : at::Tensor();
  cpu::attention_backward(dtype_of(q, "q"), shape, attention_options(mode, causal, scale, valid_lengths ? &valid : nullptr),
                          strided(grad_out), strided(q), strided(k), strided(v), strided(out), strided(lse),
                          strided_out(grad_q), strided_out(grad_k), strided_out(grad_v));
  return {grad_q, grad_k, grad_v};
}

}  // namespace
}  // namespace skyloom::bindings

TORCH_LIBRARY(skyloom, m) {
  m.def("patchify(Tensor x, int[3] patch_size) -> Tensor");
  m.def("unpatchify(Tensor tokens, int[3] patch_size, int[3] grid) -> Tensor");
  m.def(
      "spacetime_attention_forward(Tensor q, Tensor k, Tensor v, str mode, bool causal, float scale, "
      "Tensor? valid_lengths) -> (Tensor out, Tensor lse)");
  m.def(
      "spacetime_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "str mode, bool causal, float scale, Tensor? valid_lengths) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");
}

TORCH_LIBRARY_IMPL(skyloom, CPU, m) {
  m.impl("patchify", &skyloom::bindings::patchify_cpu);
  m.impl("unpatchify", &skyloom::bindings::unpatchify_cpu);
  m.impl("spacetime_attention_forward", &skyloom::bindings::attention_forward_cpu);
  m.impl("spacetime_attention_backward", &skyloom::bindings::attention_backward_cpu);
}
