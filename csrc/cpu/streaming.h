// Streaming (non-temporal) stores for large CPU outputs. A normal store to a line that is not in
// cache first reads the line from memory; a streaming store writes whole lines past the caches.
// That pays when an output is too large to still be cached when the next op reads it, and costs
// when it is small enough to be. On the 2-core Zen 4 VM (32 MiB L3 shared with other tenants),
// patchify with its tokens streamed was 1.7-2.8x slower for 4-8 MiB outputs, either way at
// 10 MiB, and 1.3-1.9x faster from 12 MiB on (benchmarks/patchify_kernel.cpp; docs/performance.md,
// 2026-12-07); a CPU with a larger cache share would gain from a larger threshold.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace skyloom::cpu {

constexpr int64_t kStreamOutputBytes = int64_t(12) << 20;

// Whether an output of this many bytes is written with streaming stores.
inline bool stream_output(int64_t bytes) { return bytes >= kStreamOutputBytes; }

// dst[0, bytes) = src[0, bytes): the 16-byte-aligned middle of dst with streaming stores, the
// ragged ends as usual. A plain memcpy off x86.
inline void stream_copy(void* dst, const void* src, int64_t bytes) {
#if defined(__x86_64__)
  char* d = static_cast<char*>(dst);
  const char* s = static_cast<const char*>(src);
  int64_t i = std::min<int64_t>(bytes, (16 - int64_t(reinterpret_cast<uintptr_t>(d) % 16)) % 16);
  std::memcpy(d, s, size_t(i));
  for (; i + 16 <= bytes; i += 16)
    _mm_stream_si128(reinterpret_cast<__m128i*>(d + i), _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i)));
  std::memcpy(d + i, s + i, size_t(bytes - i));
#else
  std::memcpy(dst, src, size_t(bytes));
#endif
}

// Orders this thread's streaming stores before its later ones: call before the data is handed on.
inline void stream_fence() {
#if defined(__x86_64__)
  _mm_sfence();
#endif
}

}  // namespace skyloom::cpu
