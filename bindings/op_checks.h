// Argument checks and tensor glue shared by the CPU and CUDA implementations of the
// torch.ops.skyloom ops. The Python wrappers in skyloom.ops check the same things first
// with friendlier errors; these keep the ops safe when they are called directly.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <string>
#include <vector>

#include "cpu/attention.h"
#include "cpu/dtypes.h"
#include "cpu/patchify.h"

namespace skyloom::bindings {

inline DType dtype_of(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default:
      TORCH_CHECK(false, name, " must be float32, float16, bfloat16 or float64, got ", t.scalar_type());
  }
}

inline cpu::PatchGeometry patch_geometry(at::IntArrayRef video_shape, at::IntArrayRef patch_size) {
  TORCH_CHECK(patch_size.size() == 3, "patch_size must be (pt, ph, pw), got ", patch_size);
  const cpu::PatchGeometry g{video_shape[0], video_shape[1], video_shape[2], video_shape[3], video_shape[4],
                             patch_size[0],  patch_size[1],  patch_size[2]};
  TORCH_CHECK(g.pt > 0 && g.ph > 0 && g.pw > 0, "patch_size must be positive, got ", patch_size);
  TORCH_CHECK(g.T % g.pt == 0 && g.H % g.ph == 0 && g.W % g.pw == 0, "video (B, C, T, H, W) = ", video_shape,
              " is not divisible by patch_size ", patch_size);
  return g;
}

inline cpu::PatchGeometry check_patchify(const at::Tensor& x, at::IntArrayRef patch_size) {
  TORCH_CHECK(x.dim() == 5, "patchify: x must be (B, C, T, H, W), got shape ", x.sizes());
  dtype_of(x, "patchify: x");
  return patch_geometry(x.sizes(), patch_size);
}

inline cpu::PatchGeometry check_unpatchify(const at::Tensor& tokens, at::IntArrayRef patch_size, at::IntArrayRef grid) {
  TORCH_CHECK(tokens.dim() == 3, "unpatchify: tokens must be (B, N, C·pt·ph·pw), got shape ", tokens.sizes());
  dtype_of(tokens, "unpatchify: tokens");
  TORCH_CHECK(patch_size.size() == 3 && grid.size() == 3, "unpatchify: patch_size and grid must have 3 entries");
  const int64_t volume = patch_size[0] * patch_size[1] * patch_size[2];
  TORCH_CHECK(volume > 0 && tokens.size(2) % volume == 0, "unpatchify: token features ", tokens.size(2),
              " are not a multiple of pt·ph·pw = ", volume);
  TORCH_CHECK(grid[0] * grid[1] * grid[2] == tokens.size(1), "unpatchify: grid ", grid, " has ",
              grid[0] * grid[1] * grid[2], " cells but tokens has N = ", tokens.size(1));
  const int64_t shape[5] = {tokens.size(0), tokens.size(2) / volume, grid[0] * patch_size[0],
                            grid[1] * patch_size[1], grid[2] * patch_size[2]};
  return patch_geometry(at::IntArrayRef(shape, 5), patch_size);
}

inline cpu::AttentionMode parse_mode(const std::string& mode) {
  if (mode == "full") return cpu::AttentionMode::kFull;
  if (mode == "spatial") return cpu::AttentionMode::kSpatial;
  if (mode == "temporal") return cpu::AttentionMode::kTemporal;
  TORCH_CHECK(false, "spacetime_attention: mode must be 'full', 'spatial' or 'temporal', got '", mode, "'");
}

// Checks q, k, v (and any further same-shaped tensors) and returns the shape.
inline cpu::AttentionShape check_attention(const std::vector<std::pair<const at::Tensor*, const char*>>& tensors,
                                           const c10::optional<at::Tensor>& valid_lengths, const std::string& mode) {
  const at::Tensor& q = *tensors[0].first;
  TORCH_CHECK(q.dim() == 5, "spacetime_attention: q must be (B, T, S, heads, head_dim), got shape ", q.sizes());
  dtype_of(q, "spacetime_attention: q");
  for (const auto& [t, name] : tensors) {
    TORCH_CHECK(t->sizes() == q.sizes(), "spacetime_attention: ", name, " has shape ", t->sizes(),
                " but q has shape ", q.sizes(), "; they must match");
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), "spacetime_attention: ", name, " is ", t->scalar_type(),
                " but q is ", q.scalar_type());
    TORCH_CHECK(t->device() == q.device(), "spacetime_attention: ", name, " is on ", t->device(), " but q is on ",
                q.device());
  }
  const cpu::AttentionMode m = parse_mode(mode);
  if (valid_lengths) {
    TORCH_CHECK(m == cpu::AttentionMode::kFull, "spacetime_attention: valid_lengths only applies to mode='full'");
    TORCH_CHECK(valid_lengths->dim() == 1 && valid_lengths->size(0) == q.size(0),
                "spacetime_attention: valid_lengths must be (B,) = (", q.size(0), ",), got shape ",
                valid_lengths->sizes());
    TORCH_CHECK(valid_lengths->scalar_type() == at::kLong, "spacetime_attention: valid_lengths must be int64, got ",
                valid_lengths->scalar_type());
    TORCH_CHECK(valid_lengths->device() == q.device(), "spacetime_attention: valid_lengths is on ",
                valid_lengths->device(), " but q is on ", q.device());
  }
  return {q.size(0), q.size(1), q.size(2), q.size(3), q.size(4)};
}

// The kernels want unit stride over head_dim; any other strides are read in place.
inline at::Tensor unit_last_stride(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

inline cpu::Strided strided(const at::Tensor& t) {
  return {t.data_ptr(), {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}};
}
inline cpu::StridedOut strided_out(at::Tensor& t) {
  return {t.data_ptr(), {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}};
}

// valid: the contiguous int64 valid_lengths tensor, or nullptr; kernels read it through the pointer.
inline cpu::AttentionOptions attention_options(const std::string& mode, bool causal, double scale,
                                               const at::Tensor* valid) {
  cpu::AttentionOptions o;
  o.mode = parse_mode(mode);
  o.causal = causal;
  o.scale = scale;
  o.valid_lengths = valid ? valid->data_ptr<int64_t>() : nullptr;
  return o;
}

inline at::ScalarType lse_dtype(const at::Tensor& q) { return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace skyloom::bindings
