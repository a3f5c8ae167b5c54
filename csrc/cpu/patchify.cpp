#include "cpu/patchify.h"

#include <stdexcept>

namespace skyloom::cpu {
namespace {

// The pw pixels of one patch row are contiguous on both sides when the video's W stride and
// the tokens' feature stride are 1: then the inner copy is a fixed-size run the compiler can
// unroll (PW > 0); PW == 0 is the general strided loop.
template <class Elem, bool kToTokens, int PW>
inline void copy_row(const Elem* src, Elem* dst, int64_t v_row, int64_t t_row, int64_t GW, int64_t pw,
                     const int64_t vs[5], const int64_t ts[3]) {
  if constexpr (PW > 0) {
    const int64_t t_step = ts[1];
    for (int64_t gw = 0; gw < GW; ++gw)
      for (int iw = 0; iw < PW; ++iw) {
        if (kToTokens)
          dst[t_row + gw * t_step + iw] = src[v_row + gw * PW + iw];
        else
          dst[v_row + gw * PW + iw] = src[t_row + gw * t_step + iw];
      }
  } else {
    for (int64_t gw = 0; gw < GW; ++gw)
      for (int64_t iw = 0; iw < pw; ++iw) {
        const int64_t v = v_row + (gw * pw + iw) * vs[4], t = t_row + gw * ts[1] + iw * ts[2];
        if (kToTokens)
          dst[t] = src[v];
        else
          dst[v] = src[t];
      }
  }
}

// One (b, gt, gh) slab at a time: a row of GW tokens on one side, pt·ph rows of W pixels per
// channel on the other, both small enough to stay in L1/L2 while the copy runs.
// Elem is only a container of the right size: the copy never interprets the bits.
template <class Elem, bool kToTokens, int PW>
void patch_copy(const Elem* src, Elem* dst, const int64_t vs[5], const int64_t ts[3], const PatchGeometry& g) {
  const int64_t GT = g.T / g.pt, GH = g.H / g.ph, GW = g.W / g.pw;
  const int64_t slabs = g.B * GT * GH;
#pragma omp parallel for schedule(static)
  for (int64_t slab = 0; slab < slabs; ++slab) {
    const int64_t b = slab / (GT * GH), gt = (slab / GH) % GT, gh = slab % GH;
    for (int64_t c = 0; c < g.C; ++c)
      for (int64_t it = 0; it < g.pt; ++it)
        for (int64_t ih = 0; ih < g.ph; ++ih) {
          const int64_t v_row = b * vs[0] + c * vs[1] + (gt * g.pt + it) * vs[2] + (gh * g.ph + ih) * vs[3];
          const int64_t f0 = ((c * g.pt + it) * g.ph + ih) * g.pw;
          const int64_t t_row = b * ts[0] + (gt * GH + gh) * GW * ts[1] + f0 * ts[2];
          copy_row<Elem, kToTokens, PW>(src, dst, v_row, t_row, GW, g.pw, vs, ts);
        }
  }
}

template <class Elem, bool kToTokens>
void patch_copy_any(const void* src, void* dst, const int64_t vs[5], const int64_t ts[3], const PatchGeometry& g) {
  const Elem* s = static_cast<const Elem*>(src);
  Elem* d = static_cast<Elem*>(dst);
  if (vs[4] != 1 || ts[2] != 1) return patch_copy<Elem, kToTokens, 0>(s, d, vs, ts, g);
  switch (g.pw) {
    case 1: return patch_copy<Elem, kToTokens, 1>(s, d, vs, ts, g);
    case 2: return patch_copy<Elem, kToTokens, 2>(s, d, vs, ts, g);
    case 4: return patch_copy<Elem, kToTokens, 4>(s, d, vs, ts, g);
    default: return patch_copy<Elem, kToTokens, 0>(s, d, vs, ts, g);
  }
}

template <bool kToTokens>
void dispatch(const void* src, void* dst, const int64_t vs[5], const int64_t ts[3], const PatchGeometry& g,
              int64_t element_size) {
  switch (element_size) {
    case 1: return patch_copy_any<uint8_t, kToTokens>(src, dst, vs, ts, g);
    case 2: return patch_copy_any<uint16_t, kToTokens>(src, dst, vs, ts, g);
    case 4: return patch_copy_any<uint32_t, kToTokens>(src, dst, vs, ts, g);
    case 8: return patch_copy_any<uint64_t, kToTokens>(src, dst, vs, ts, g);
    default: throw std::invalid_argument("patchify: element size must be 1, 2, 4 or 8 bytes");
  }
}

}  // namespace

void patchify(const void* video, const int64_t video_strides[5], void* tokens, const PatchGeometry& g,
              int64_t element_size) {
  const int64_t F = g.C * g.pt * g.ph * g.pw;
  const int64_t N = (g.T / g.pt) * (g.H / g.ph) * (g.W / g.pw);
  const int64_t ts[3] = {N * F, F, 1};
  dispatch<true>(video, tokens, video_strides, ts, g, element_size);
}

void unpatchify(const void* tokens, const int64_t token_strides[3], void* video, const PatchGeometry& g,
                int64_t element_size) {
  const int64_t vs[5] = {g.C * g.T * g.H * g.W, g.T * g.H * g.W, g.H * g.W, g.W, 1};
  dispatch<false>(tokens, video, vs, token_strides, g, element_size);
}

}  // namespace skyloom::cpu
