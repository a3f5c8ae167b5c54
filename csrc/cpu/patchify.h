// Patchify / unpatchify on the CPU: a strided gather between a video (B, C, T, H, W) and its
// patch tokens (B, N, C·pt·ph·pw). Token n = (gt·GH + gh)·GW + gw (t-major, then h, then w);
// feature f = ((c·pt + it)·ph + ih)·pw + iw. Pure data movement, so it works on raw bytes of
// any element size and is bit-exact.
#pragma once

#include <cstdint>

namespace skyloom::cpu {

struct PatchGeometry {
  int64_t B, C, T, H, W;  // video shape
  int64_t pt, ph, pw;     // patch size; T, H, W are multiples of it
};

// tokens[b, n, f] = video[b, c, t, h, w]. video_strides are in elements (any strides);
// tokens is written contiguous (B, N, C·pt·ph·pw).
void patchify(const void* video, const int64_t video_strides[5], void* tokens, const PatchGeometry& g,
              int64_t element_size);

// video[b, c, t, h, w] = tokens[b, n, f]. token_strides are in elements (any strides);
// video is written contiguous (B, C, T, H, W).
void unpatchify(const void* tokens, const int64_t token_strides[3], void* video, const PatchGeometry& g,
                int64_t element_size);

}  // namespace skyloom::cpu
