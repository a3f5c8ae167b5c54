#include "cpu/patchify.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "cpu/capability.h"
#include "cpu/streaming.h"

namespace skyloom::cpu {
namespace {

// One (b, gt, gh) slab at a time: a row of GW tokens on one side, pt·ph rows of W pixels per
// channel on the other. With unit stride over w and features (PH, PW > 0), the tokens are the
// side kept in cache, a block of them (kTokenBlockBytes) at a time, while the video side
// streams past as whole pixel rows, each cut into runs of pw pixels, one run per token.
// Walking token by token instead reads C·pt·ph rows per token; their channel stride (H·W
// elements, often a multiple of 4 KiB) puts them all in one L1 set, where they evict each
// other. Otherwise (PH = PW = 0) a general strided loop.
// Elem is only a container of the right size: the copy never interprets the bits.
constexpr int64_t kTokenBlockBytes = 16 * 1024;  // half of a 32 KiB L1 data cache

// The fast path's 8-byte runs (pw·element size = 8) move as lanes x lanes tiles: `lanes`
// neighbouring tokens are one vector of each pixel row, and `lanes` consecutive rows are one
// vector of each token, so a transpose of 8-byte lanes turns loads of one side into stores of
// the other, each a vector wide. in[i] / out[i] are the i-th vector of the first tile; tile g is
// at in[i] + g·in_step and out[i] + g·out_step (bytes). A transpose is its own inverse, so the
// same function serves patchify (rows in, tokens out) and unpatchify.
using MoveTiles = void (*)(const char* const in[], int64_t in_step, char* const out[], int64_t out_step,
                           int64_t tiles);

struct TileMover {
  int64_t lanes;
  MoveTiles move;
};

namespace baseline {
typedef uint64_t V2 __attribute__((vector_size(16)));  // GCC vector extension: SSE2 / NEON

V2 load(const char* p) {
  V2 x;
  std::memcpy(&x, p, sizeof(x));
  return x;
}
void store(char* p, V2 x) { std::memcpy(p, &x, sizeof(x)); }

void move_tiles(const char* const in[], int64_t in_step, char* const out[], int64_t out_step, int64_t tiles) {
  const char *in0 = in[0], *in1 = in[1];  // locals: the stores below may alias in[] and out[]
  char *out0 = out[0], *out1 = out[1];
  for (int64_t g = 0; g < tiles; ++g) {
    const V2 a = load(in0 + g * in_step), b = load(in1 + g * in_step);
    store(out0 + g * out_step, __builtin_shuffle(a, b, V2{0, 2}));
    store(out1 + g * out_step, __builtin_shuffle(a, b, V2{1, 3}));
  }
}
}  // namespace baseline

#if SKY_X86_KERNELS
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v3")
namespace avx2 {
typedef uint64_t V4 __attribute__((vector_size(32)));

V4 load(const char* p) {  // defined here, not shared, so that it is compiled for AVX2
  V4 x;
  std::memcpy(&x, p, sizeof(x));
  return x;
}
void store(char* p, V4 x) { std::memcpy(p, &x, sizeof(x)); }

void move_tiles(const char* const in[], int64_t in_step, char* const out[], int64_t out_step, int64_t tiles) {
  const char *in0 = in[0], *in1 = in[1], *in2 = in[2], *in3 = in[3];
  char *out0 = out[0], *out1 = out[1], *out2 = out[2], *out3 = out[3];
  for (int64_t g = 0; g < tiles; ++g) {
    const V4 a = load(in0 + g * in_step), b = load(in1 + g * in_step);
    const V4 c = load(in2 + g * in_step), d = load(in3 + g * in_step);
    const V4 ab_even = __builtin_shuffle(a, b, V4{0, 4, 2, 6}), ab_odd = __builtin_shuffle(a, b, V4{1, 5, 3, 7});
    const V4 cd_even = __builtin_shuffle(c, d, V4{0, 4, 2, 6}), cd_odd = __builtin_shuffle(c, d, V4{1, 5, 3, 7});
    store(out0 + g * out_step, __builtin_shuffle(ab_even, cd_even, V4{0, 1, 4, 5}));
    store(out1 + g * out_step, __builtin_shuffle(ab_odd, cd_odd, V4{0, 1, 4, 5}));
    store(out2 + g * out_step, __builtin_shuffle(ab_even, cd_even, V4{2, 3, 6, 7}));
    store(out3 + g * out_step, __builtin_shuffle(ab_odd, cd_odd, V4{2, 3, 6, 7}));
  }
}
}  // namespace avx2
#pragma GCC pop_options
#endif

TileMover tile_mover() {
  const std::string capability = cpu_capability();  // on every build, so a bad SKYLOOM_CPU_CAPABILITY is an error
#if SKY_X86_KERNELS
  if (capability != "default") return {4, avx2::move_tiles};  // AVX-512 CPUs run the AVX2 tiles
#endif
  return {2, baseline::move_tiles};
}

// One run of PW pixels between video offset v and token offset t.
template <class Elem, bool kToTokens, int PW>
void copy_run(const Elem* src, Elem* dst, int64_t v, int64_t t) {
  if (kToTokens)
    std::memcpy(dst + t, src + v, sizeof(Elem) * PW);
  else
    std::memcpy(dst + v, src + t, sizeof(Elem) * PW);
}

template <class Elem, bool kToTokens, int PH, int PW>
void patch_copy(const Elem* src, Elem* dst, const int64_t vs[5], const int64_t ts[3], const PatchGeometry& g,
                bool stream) {
  [[maybe_unused]] const TileMover mover = tile_mover();  // outside the parallel loop: it reads the environment
  const int64_t GT = g.T / g.pt, GH = g.H / g.ph, GW = g.W / g.pw;
  const int64_t slabs = g.B * GT * GH;
  const int64_t ph = PH > 0 ? PH : g.ph, pw = PW > 0 ? PW : g.pw;
  const int64_t rows = g.C * g.pt * ph, token_stride = ts[1];  // pixel rows per slab, in feature order
  int64_t block = std::max<int64_t>(1, kTokenBlockBytes / (rows * pw * int64_t(sizeof(Elem))));
  if (block >= 4) block -= block % 4;  // whole tiles of either width, so only the slab's last block has a tail
  // Streamed (patchify's contiguous tokens only), a block is gathered into a per-thread buffer
  // that stays in L1 and then copied out whole lines at a time: the gather fills each line of a
  // token in several visits, which streaming stores cannot do.
  stream = stream && kToTokens && PH > 0 && PW > 0 && ts[2] == 1 && token_stride == rows * pw;
  // Video offset of each of a slab's pixel rows (c, it, ih), in feature order, from the slab's first.
  std::vector<int64_t> row_offsets;
  for (int64_t c = 0; c < g.C; ++c)
    for (int64_t it = 0; it < g.pt; ++it)
      for (int64_t ih = 0; ih < ph; ++ih) row_offsets.push_back(c * vs[1] + it * vs[2] + ih * vs[3]);
#pragma omp parallel
  {
    std::vector<Elem> gathered(stream ? size_t(block * token_stride) : 0);
#pragma omp for schedule(static)
    for (int64_t slab = 0; slab < slabs; ++slab) {
      const int64_t b = slab / (GT * GH), gt = (slab / GH) % GT, gh = slab % GH;
      const int64_t v_slab = b * vs[0] + gt * g.pt * vs[2] + gh * ph * vs[3];
      const int64_t t_slab = b * ts[0] + (gt * GH + gh) * GW * ts[1];
      if constexpr (PH > 0 && PW > 0) {
        const auto v_row = [&](int64_t r) { return v_slab + row_offsets[r]; };
        for (int64_t gw0 = 0; gw0 < GW; gw0 += block) {
          const int64_t gw_end = std::min(GW, gw0 + block);
          // where this block's tokens go: token gw at out + t_block + gw·token_stride
          Elem* out = stream ? gathered.data() : dst;
          const int64_t t_block = stream ? -gw0 * token_stride : t_slab;
          int64_t r = 0;
          if constexpr (sizeof(Elem) * PW == 8) {
            const int64_t L = mover.lanes, tiles = (gw_end - gw0) / L, run = sizeof(Elem) * PW;
            for (; tiles > 0 && r + L <= rows; r += L) {
              const char* in[4];  // L pixel rows and L tokens, whichever side is read
              char* to[4];
              for (int64_t i = 0; i < L; ++i) {
                const int64_t v = v_row(r + i) + gw0 * PW, t = t_block + (gw0 + i) * token_stride + r * PW;
                in[i] = reinterpret_cast<const char*>(src + (kToTokens ? v : t));
                to[i] = reinterpret_cast<char*>(out + (kToTokens ? t : v));
              }
              const int64_t row_step = L * run, token_step = L * token_stride * int64_t(sizeof(Elem));
              mover.move(in, kToTokens ? row_step : token_step, to, kToTokens ? token_step : row_step, tiles);
              for (int64_t gw = gw0 + tiles * L; gw < gw_end; ++gw)
                for (int64_t i = 0; i < L; ++i)
                  copy_run<Elem, kToTokens, PW>(src, out, v_row(r + i) + gw * PW,
                                                t_block + gw * token_stride + (r + i) * PW);
            }
          }
          for (; r < rows; ++r) {
            const int64_t v = v_row(r);
            for (int64_t gw = gw0; gw < gw_end; ++gw)
              copy_run<Elem, kToTokens, PW>(src, out, v + gw * PW, t_block + gw * token_stride + r * PW);
          }
          if (stream)
            stream_copy(dst + t_slab + gw0 * token_stride, gathered.data(),
                        (gw_end - gw0) * token_stride * int64_t(sizeof(Elem)));
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
    if (stream) stream_fence();
  }
}

template <class Elem, bool kToTokens, int PH>
void patch_copy_pw(const Elem* s, Elem* d, const int64_t vs[5], const int64_t ts[3], const PatchGeometry& g,
                   bool stream) {
  switch (g.pw) {
    case 1: return patch_copy<Elem, kToTokens, PH, 1>(s, d, vs, ts, g, stream);
    case 2: return patch_copy<Elem, kToTokens, PH, 2>(s, d, vs, ts, g, stream);
    case 4: return patch_copy<Elem, kToTokens, PH, 4>(s, d, vs, ts, g, stream);
    default: return patch_copy<Elem, kToTokens, 0, 0>(s, d, vs, ts, g, stream);
  }
}

template <class Elem, bool kToTokens>
void patch_copy_any(const void* src, void* dst, const int64_t vs[5], const int64_t ts[3], const PatchGeometry& g,
                    bool stream) {
  const Elem* s = static_cast<const Elem*>(src);
  Elem* d = static_cast<Elem*>(dst);
  if (vs[4] != 1 || ts[2] != 1) return patch_copy<Elem, kToTokens, 0, 0>(s, d, vs, ts, g, stream);
  switch (g.ph) {
    case 1: return patch_copy_pw<Elem, kToTokens, 1>(s, d, vs, ts, g, stream);
    case 2: return patch_copy_pw<Elem, kToTokens, 2>(s, d, vs, ts, g, stream);
    default: return patch_copy<Elem, kToTokens, 0, 0>(s, d, vs, ts, g, stream);
  }
}

// stream: write the output with streaming stores where the loop allows (streaming.h).
template <bool kToTokens>
void dispatch(const void* src, void* dst, const int64_t vs[5], const int64_t ts[3], const PatchGeometry& g,
              int64_t element_size, bool stream) {
  switch (element_size) {
    case 1: return patch_copy_any<uint8_t, kToTokens>(src, dst, vs, ts, g, stream);
    case 2: return patch_copy_any<uint16_t, kToTokens>(src, dst, vs, ts, g, stream);
    case 4: return patch_copy_any<uint32_t, kToTokens>(src, dst, vs, ts, g, stream);
    case 8: return patch_copy_any<uint64_t, kToTokens>(src, dst, vs, ts, g, stream);
    default: throw std::invalid_argument("patchify: element size must be 1, 2, 4 or 8 bytes");
  }
}

}  // namespace

void patchify(const void* video, const int64_t video_strides[5], void* tokens, const PatchGeometry& g,
              int64_t element_size) {
  const int64_t F = g.C * g.pt * g.ph * g.pw;
  const int64_t N = (g.T / g.pt) * (g.H / g.ph) * (g.W / g.pw);
  const int64_t ts[3] = {N * F, F, 1};
  dispatch<true>(video, tokens, video_strides, ts, g, element_size, stream_output(g.B * N * F * element_size));
}

void unpatchify(const void* tokens, const int64_t token_strides[3], void* video, const PatchGeometry& g,
                int64_t element_size) {
  const int64_t vs[5] = {g.C * g.T * g.H * g.W, g.T * g.H * g.W, g.H * g.W, g.W, 1};
  // Unpatchify writes each video row whole and could stream without a buffer; not measured yet,
  // so it stores the usual way.
  dispatch<false>(tokens, video, vs, token_strides, g, element_size, false);
}

}  // namespace skyloom::cpu
