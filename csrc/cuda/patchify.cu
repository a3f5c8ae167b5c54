// Patchify / unpatchify on the GPU: one thread per VEC consecutive pixels of a video row, so
// the video side is read (patchify) or written (unpatchify) with 16-byte vector accesses
// whenever the W axis is unit-stride and aligned; the token side is touched in runs of pw.
#include <cstdint>
#include <stdexcept>

#include "cuda/kernels.h"

namespace skyloom::cuda {
namespace {

struct Geometry {
  int64_t B, C, T, H, W, pt, ph, pw;
  int64_t vs[5];  // video strides (elements)
  int64_t ts[3];  // token strides (elements)
};

template <class Elem, int VEC, bool kToTokens>
__global__ void patch_copy_kernel(const Elem* __restrict__ src, Elem* __restrict__ dst, Geometry g, int64_t groups) {
  const int64_t GH = g.H / g.ph, GW = g.W / g.pw;
  const int64_t groups_per_row = g.W / VEC;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < groups;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t w0 = (idx % groups_per_row) * VEC;
    int64_t r = idx / groups_per_row;
    const int64_t h = r % g.H;
    r /= g.H;
    const int64_t t = r % g.T;
    r /= g.T;
    const int64_t c = r % g.C;
    const int64_t b = r / g.C;
    const int64_t v_off = b * g.vs[0] + c * g.vs[1] + t * g.vs[2] + h * g.vs[3] + w0 * g.vs[4];
    const int64_t n_row = ((t / g.pt) * GH + h / g.ph) * GW;
    const int64_t f_row = ((c * g.pt + t % g.pt) * g.ph + h % g.ph) * g.pw;
    union {
      uint4 raw[VEC * sizeof(Elem) >= 16 ? VEC * sizeof(Elem) / 16 : 1];
      Elem e[VEC];
    } pixels;
    if (kToTokens) {
      if constexpr (VEC * sizeof(Elem) == 16)
        pixels.raw[0] = *reinterpret_cast<const uint4*>(src + v_off);
      else
        for (int i = 0; i < VEC; ++i) pixels.e[i] = src[v_off + i * g.vs[4]];
    }
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const int64_t w = w0 + i;
      const int64_t t_off = b * g.ts[0] + (n_row + w / g.pw) * g.ts[1] + (f_row + w % g.pw) * g.ts[2];
      if (kToTokens)
        dst[t_off] = pixels.e[i];
      else
        pixels.e[i] = src[t_off];
    }
    if (!kToTokens) {
      if constexpr (VEC * sizeof(Elem) == 16)
        *reinterpret_cast<uint4*>(dst + v_off) = pixels.raw[0];
      else
        for (int i = 0; i < VEC; ++i) dst[v_off + i * g.vs[4]] = pixels.e[i];
    }
  }
}

template <class Elem, bool kToTokens>
void launch(const void* src, void* dst, const Geometry& g, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(Elem);
  const void* video = kToTokens ? src : static_cast<const void*>(dst);
  const bool vectorised = g.vs[4] == 1 && g.W % kVec == 0 && g.vs[0] % kVec == 0 && g.vs[1] % kVec == 0 &&
                          g.vs[2] % kVec == 0 && g.vs[3] % kVec == 0 &&
                          reinterpret_cast<uintptr_t>(video) % 16 == 0;
  const int64_t pixels = g.B * g.C * g.T * g.H * g.W;
  const int threads = 256;
  if (vectorised) {
    const int64_t groups = pixels / kVec;
    const int blocks = int((groups + threads - 1) / threads < 65535 * 8 ? (groups + threads - 1) / threads : 65535 * 8);
    patch_copy_kernel<Elem, kVec, kToTokens>
        <<<blocks, threads, 0, stream>>>(static_cast<const Elem*>(src), static_cast<Elem*>(dst), g, groups);
  } else {
    const int blocks = int((pixels + threads - 1) / threads < 65535 * 8 ? (pixels + threads - 1) / threads : 65535 * 8);
    patch_copy_kernel<Elem, 1, kToTokens>
        <<<blocks, threads, 0, stream>>>(static_cast<const Elem*>(src), static_cast<Elem*>(dst), g, pixels);
  }
}

template <bool kToTokens>
void dispatch(const void* src, void* dst, const Geometry& g, int64_t element_size, cudaStream_t stream) {
  switch (element_size) {
    case 2: return launch<uint16_t, kToTokens>(src, dst, g, stream);
    case 4: return launch<uint32_t, kToTokens>(src, dst, g, stream);
    case 8: return launch<uint64_t, kToTokens>(src, dst, g, stream);
    default: throw std::invalid_argument("patchify (CUDA): element size must be 2, 4 or 8 bytes");
  }
}

Geometry geometry(const PatchGeometry& p) { return {p.B, p.C, p.T, p.H, p.W, p.pt, p.ph, p.pw, {}, {}}; }

}  // namespace

void patchify(const void* video, const int64_t video_strides[5], void* tokens, const PatchGeometry& p,
              int64_t element_size, cudaStream_t stream) {
  Geometry g = geometry(p);
  for (int i = 0; i < 5; ++i) g.vs[i] = video_strides[i];
  const int64_t F = p.C * p.pt * p.ph * p.pw, N = (p.T / p.pt) * (p.H / p.ph) * (p.W / p.pw);
  g.ts[0] = N * F, g.ts[1] = F, g.ts[2] = 1;
  dispatch<true>(video, tokens, g, element_size, stream);
}

void unpatchify(const void* tokens, const int64_t token_strides[3], void* video, const PatchGeometry& p,
                int64_t element_size, cudaStream_t stream) {
  Geometry g = geometry(p);
  for (int i = 0; i < 3; ++i) g.ts[i] = token_strides[i];
  g.vs[4] = 1, g.vs[3] = p.W, g.vs[2] = p.H * p.W, g.vs[1] = p.T * p.H * p.W, g.vs[0] = p.C * p.T * p.H * p.W;
  dispatch<false>(tokens, video, g, element_size, stream);
}

}  // namespace skyloom::cuda
