// The CPU patchify kernel alone, against memcpy of the same bytes: no torch, no allocation, both
// buffers touched before timing, so the figure is the loop's own (bench_ops.py times the op as a
// user calls it, allocation and dispatch included). fp32 video (1, 16, T, H, W), patch (1, 2, 2).
//
//   g++ -O3 -fopenmp -Icsrc -o /tmp/patchify_kernel benchmarks/patchify_kernel.cpp csrc/cpu/patchify.cpp csrc/cpu/capability.cpp
//   /tmp/patchify_kernel 21 60 104      # T H W; OMP_NUM_THREADS and SKYLOOM_CPU_CAPABILITY apply
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "cpu/capability.h"
#include "cpu/patchify.h"

namespace {

template <class Fn>
double median_us(Fn fn, int repeats = 200) {
  std::vector<double> times;
  for (int i = 0; i < repeats; ++i) {
    const auto start = std::chrono::steady_clock::now();
    fn();
    times.push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start).count());
  }
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: %s T H W   (H and W even)\n", argv[0]);
    return 2;
  }
  const int64_t C = 16, T = std::atoll(argv[1]), H = std::atoll(argv[2]), W = std::atoll(argv[3]);
  if (T < 1 || H < 2 || W < 2 || H % 2 || W % 2) {
    std::fprintf(stderr, "T must be >= 1 and H, W even and >= 2, got T=%s H=%s W=%s\n", argv[1], argv[2], argv[3]);
    return 2;
  }
  const skyloom::cpu::PatchGeometry g{1, C, T, H, W, 1, 2, 2};
  const size_t n = size_t(C * T * H * W);
  std::vector<float> video(n, 1.0f), tokens(n, 0.0f);
  const int64_t video_strides[5] = {C * T * H * W, T * H * W, H * W, W, 1};
  const int64_t token_strides[3] = {int64_t(n), C * 4, 1};
  const double copy = median_us([&] {
#pragma omp parallel
    {
      const size_t t = omp_get_thread_num(), threads = omp_get_num_threads();
      const size_t lo = n * t / threads, hi = n * (t + 1) / threads;
      std::memcpy(tokens.data() + lo, video.data() + lo, (hi - lo) * sizeof(float));
    }
  });
  const double patchify = median_us([&] { skyloom::cpu::patchify(video.data(), video_strides, tokens.data(), g, 4); });
  const double unpatchify =
      median_us([&] { skyloom::cpu::unpatchify(tokens.data(), token_strides, video.data(), g, 4); });
  std::printf("%zu KiB, %d threads, %s kernels: patchify %.1f us, unpatchify %.1f us, memcpy %.1f us -> "
              "%.2f / %.2f of memcpy\n",
              n * sizeof(float) / 1024, omp_get_max_threads(), skyloom::cpu::cpu_capability().c_str(), patchify,
              unpatchify, copy, copy / patchify, copy / unpatchify);
}
