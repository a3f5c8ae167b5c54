#include "cpu/patchify.h"

#include <cstring>

#include <stdexcept>

namespace skyloom::cpu {
namespace {

// One (b, gt, gh) slab at a time: a row of GW tokens on one side, pt·ph rows of W pixels per
// channel on the other, both small enough to stay in cache while the copy runs.
// With unit stride over w and features (PH, PW > 0), the token side is walked in memory
// order: token after token, each written front to back as runs of pw pixels gathered from
// its C·pt·ph pixel rows, whose cache lines are reused by the next GW tokens. That keeps the
// big side of the copy a sequential stream. Otherwise (PH = PW = 0) a general strided loop.
// Elem is only a container of the right size: the copy never interprets the bits.
template <class Elem, bool kToTokens, int PH, int PW>
void patch_copy(const Elem* src, Elem* dst, const int64_t vs[5], const int64_t ts[3], const PatchGeometry& g) {
  const int64_t GT = g.T / g.pt, GH = g.H / g.ph, GW = g.W / g.pw;
  const int64_t slabs = g.B * GT * GH;
  const int64_t ph = PH > 0 ? PH : g.ph, pw = PW > 0 ? PW : g.pw;
#pragma omp parallel for schedule(static)
  for (int64_t slab = 0; slab < slabs; ++slab) {
    const int64_t b = slab / (GT * GH), gt = (slab / GH) % GT, gh = slab % GH;
    const int64_t v_slab = b * vs[0] + gt * g.pt * vs[2] + gh * ph * vs[3];
    const int64_t t_slab = b * ts[0] + (gt * GH + gh) * GW * ts[1];
    if constexpr (PH > 0 && PW > 0) {
      for (int64_t gw = 0; gw < GW; ++gw) {
        int64_t t = t_slab + gw * ts[1];
        const int64_t v_gw = v_slab + gw * PW;
        for (int64_t c = 0; c < g.C; ++c)
          for (int64_t it = 0; it < g.pt; ++it) {
            const int64_t v = v_gw + c * vs[1] + it * vs[2];
            for (int ih = 0; ih < PH; ++ih, t += PW) {
              if (kToTokens)
                std::memcpy(dst + t, src + v + ih * vs[3], sizeof(Elem) * PW);
              else
                std::memcpy(dst + v + ih * vs[3], src + t, sizeof(Elem) * PW);
            }
          }
      }
    } else {
      for (int64_t c = 0; c < g.C; ++c)
        for (int64_t it = 0; it < g.pt; ++it)
          for (int64_t gw = 0; gw < GW; ++gw) {
            const int64_t t = t_slab + gw * ts[1] + (c * g.pt + it) * ph * pw * ts[2];
            const int64_t v = v_slab + c * vs[1] + it * vs[2] + gw * pw * vs[4];
            for (int64_t ih = 0; ih < ph; ++ih)
              for (int64_t iw = 0; iw < pw; ++iw) {
                const int64_t vi = v + ih * vs[3] + iw * vs[4], ti = t + (ih * pw + iw) * ts[2];
                if (kToTokens)
                  dst[ti] = src[vi];
                else
                  dst[vi] = src[ti];
              }
          }
    }
  }
}

template <class Elem, bool kToTokens, int PH>
void patch_copy_pw(const Elem* s, Elem* d, const int64_t vs[5], const int64_t ts[3], const PatchGeometry& g) {
  switch (g.pw) {
    case 1: return patch_copy<Elem, kToTokens, PH, 1>(s, d, vs, ts, g);
    case 2: return patch_copy<Elem, kToTokens, PH, 2>(s, d, vs, ts, g);
    case 4: return patch_copy<Elem, kToTokens, PH, 4>(s, d, vs, ts, g);
    default: return patch_copy<Elem, kToTokens, 0, 0>(s, d, vs, ts, g);
  }
}

template <class Elem, bool kToTokens>
void patch_copy_any(const void* src, void* dst, const int64_t vs[5], const int64_t ts[3], const PatchGeometry& g) {
  const Elem* s = static_cast<const Elem*>(src);
  Elem* d = static_cast<Elem*>(dst);
  if (vs[4] != 1 || ts[2] != 1) return patch_copy<Elem, kToTokens, 0, 0>(s, d, vs, ts, g);
  switch (g.ph) {
    case 1: return patch_copy_pw<Elem, kToTokens, 1>(s, d, vs, ts, g);
    case 2: return patch_copy_pw<Elem, kToTokens, 2>(s, d, vs, ts, g);
    default: return patch_copy<Elem, kToTokens, 0, 0>(s, d, vs, ts, g);
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
