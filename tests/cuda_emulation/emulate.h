// Runs CUDA kernels on the CPU: every thread of a block is a std::thread, blocks run one
// after another, __syncthreads and __syncwarp are barriers, __shfl_xor_sync exchanges values
// through the block, atomicMax is an atomic compare-and-swap, cp.async copies land at the
// wait that releases them, static __shared__ variables are statics (one block at a time)
// and the dynamic shared memory is one buffer. WMMA fragments hold their whole 16x16 tile in
// every lane: the kernels only load, multiply and store whole
// fragments, so the results are the same, computed 32 times over. Slow, but it executes the
// kernels' own indexing, masking and synchronisation, so a machine without a GPU can check
// them against a reference. g++ reads cuda_runtime.h's host view.
#pragma once

#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <atomic>
#include <barrier>
#include <bit>
#include <cmath>
#include <cstdio>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#define SKYLOOM_CUDA_EMULATION 1
#define __launch_bounds__(...)
#undef __shared__
#define __shared__ static
#define SKYLOOM_DYNAMIC_SHARED_MEMORY(name) unsigned char* name = ::emu::dynamic_shared_memory

namespace emu {

alignas(128) inline unsigned char dynamic_shared_memory[256 * 1024];

// Barriers for every aligned group of 2, 4, 8, 16 and 32 lanes: the partial-warp masks the
// kernels use are such groups (the lanes of one row, or a whole warp).
struct BlockState {
  int threads;
  std::barrier<> block;
  std::vector<std::vector<std::unique_ptr<std::barrier<>>>> groups;  // [log2 size - 1][group]
  std::vector<float> exchange;
  std::vector<uint32_t> mma_a, mma_b;  // every lane's mma.sync A and B registers
  std::vector<const void*> rows;       // every lane's ldmatrix row address
  std::unique_ptr<std::atomic<bool>[]> exited;
  explicit BlockState(int threads)
      : threads(threads), block(threads), groups(5), exchange(threads), mma_a(4 * threads), mma_b(2 * threads),
        rows(threads), exited(new std::atomic<bool>[threads]) {
    for (int t = 0; t < threads; ++t) exited[t] = false;
    for (int level = 0; level < 5; ++level) {
      const int size = 2 << level;
      for (int g = 0; g * size < threads; ++g)
        groups[level].push_back(std::make_unique<std::barrier<>>(std::min(size, threads - g * size)));
    }
  }
};

inline thread_local BlockState* state = nullptr;
inline thread_local uint3 thread_index{0, 0, 0};
inline thread_local uint3 block_index{0, 0, 0};
inline thread_local dim3 block_dim{1, 1, 1};

// A warp-synchronous call names its lanes in mask: an aligned group of 2..32 lanes holding the
// caller, none of which may have exited (undefined on a GPU, so an error here).
inline std::barrier<>& group_of(unsigned mask) {
  const int size = std::popcount(mask);
  const int lane = int(thread_index.x % 32);
  const bool aligned_group = size >= 2 && (size & (size - 1)) == 0 &&
                             mask == (((size == 32 ? 0u : 1u << size) - 1) << (lane & ~(size - 1)));
  if (!aligned_group) {
    std::fprintf(stderr, "emulate.h: lane %d used mask %#x, not an aligned group of lanes holding it\n", lane, mask);
    std::abort();
  }
  const int first = int(thread_index.x) - lane + (lane & ~(size - 1));
  for (int t = first; t < first + size && t < state->threads; ++t)
    if (state->exited[t]) {
      std::fprintf(stderr, "emulate.h: thread %d synchronises with mask %#x, but thread %d has exited\n",
                   int(thread_index.x), mask, t);
      std::abort();
    }
  return *state->groups[std::countr_zero(unsigned(size)) - 1][thread_index.x / size];
}

// Runs kernel() for every thread of `blocks` blocks of `threads` threads.
template <class Kernel>
void launch(unsigned blocks, int threads, Kernel kernel) {
  for (unsigned b = 0; b < blocks; ++b) {
    BlockState block(threads);
    // Poison the dynamic shared memory (all-ones bytes are NaN in every float type) so that a
    // read of anything the block did not write shows in the results.
    std::memset(dynamic_shared_memory, 0xff, sizeof dynamic_shared_memory);
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t)
      pool.emplace_back([&, t] {
        state = &block;
        thread_index = {unsigned(t), 0, 0};
        block_index = {b, 0, 0};
        block_dim = dim3(unsigned(threads));
        kernel();
        block.exited[t] = true;
        // A thread that returns leaves every barrier, as an exited CUDA thread does.
        block.block.arrive_and_drop();
        for (int level = 0; level < 5; ++level) block.groups[level][t / (2 << level)]->arrive_and_drop();
      });
    for (auto& thread : pool) thread.join();
  }
}

}  // namespace emu

#define threadIdx (::emu::thread_index)
#define blockIdx (::emu::block_index)
#define blockDim (::emu::block_dim)

inline void __syncthreads() { emu::state->block.arrive_and_wait(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { emu::group_of(mask).arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned mask, float x, int lane_mask) {
  std::barrier<>& group = emu::group_of(mask);
  emu::state->exchange[threadIdx.x] = x;
  group.arrive_and_wait();
  const float y = emu::state->exchange[threadIdx.x ^ lane_mask];
  group.arrive_and_wait();
  return y;
}
inline int atomicMax(int* address, int value) {
  std::atomic_ref<int> target(*address);
  int old = target.load();
  while (old < value && !target.compare_exchange_weak(old, value)) {
  }
  return old;
}
inline int64_t min(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t max(int64_t a, int64_t b) { return a > b ? a : b; }

namespace emu {

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: the warp's lanes pool their registers and
// each computes its own four outputs. The layouts are the PTX ISA's ("Matrix Fragments for
// mma.m16n8k16 with floating point type"), lane = 4·groupID + threadID_in_group:
//   A (16 x 16): register r of lane (g, c) holds row g + 8·(r & 1), columns 2c + 8·(r >> 1) + {0, 1}
//   B (16 x 8):  register r holds rows 2c + 8·r + {0, 1} of column g
//   C (16 x 8):  element i holds row g + 8·(i >> 1), column 2c + (i & 1)
template <class T>
void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  BlockState& s = *state;
  const int t = int(thread_index.x), first = t - t % 32, lane = t % 32;
  for (int r = 0; r < 4; ++r) s.mma_a[4 * t + r] = a[r];
  s.mma_b[2 * t] = b0, s.mma_b[2 * t + 1] = b1;
  std::barrier<>& warp = group_of(0xffffffffu);
  warp.arrive_and_wait();
  auto half = [](uint32_t reg, int which) {
    T pair[2];
    std::memcpy(pair, &reg, sizeof reg);
    return static_cast<float>(pair[which]);
  };
  auto A = [&](int row, int k) {
    const int owner = first + 4 * (row % 8) + (k % 8) / 2, reg = (row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0);
    return half(s.mma_a[4 * owner + reg], k % 2);
  };
  auto B = [&](int k, int n) {
    const int owner = first + 4 * n + (k % 8) / 2, reg = k >= 8 ? 1 : 0;
    return half(s.mma_b[2 * owner + reg], k % 2);
  };
  float result[4];
  for (int i = 0; i < 4; ++i) {
    const int row = lane / 4 + 8 * (i >> 1), col = 2 * (lane % 4) + (i & 1);
    float acc = d[i];
    for (int k = 0; k < 16; ++k) acc += A(row, k) * B(k, col);
    result[i] = acc;
  }
  warp.arrive_and_wait();  // every lane has read the pool before any lane's next mma refills it
  for (int i = 0; i < 4; ++i) d[i] = result[i];
}

// ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16: lanes 8i..8i+7 give the rows of matrix i;
// register i of lane (g, c) receives its elements (2c, g) and (2c + 1, g), the first in the
// low half (PTX ISA, ldmatrix).
template <class T>
void ldmatrix_x4_trans(uint32_t (&r)[4], const T* row) {
  BlockState& s = *state;
  const int t = int(thread_index.x), first = t - t % 32, lane = t % 32, g = lane / 4, c = lane % 4;
  const auto* byte = reinterpret_cast<const unsigned char*>(row);
  if (reinterpret_cast<uintptr_t>(row) % 16 != 0 || byte < dynamic_shared_memory ||
      byte + 16 > dynamic_shared_memory + sizeof dynamic_shared_memory) {
    std::fprintf(stderr, "emulate.h: ldmatrix row address of thread %d is not a 16-byte-aligned shared row\n", t);
    std::abort();
  }
  s.rows[t] = row;
  std::barrier<>& warp = group_of(0xffffffffu);
  warp.arrive_and_wait();
  for (int i = 0; i < 4; ++i) {
    uint16_t pair[2];
    for (int h = 0; h < 2; ++h)
      std::memcpy(&pair[h], static_cast<const T*>(s.rows[first + 8 * i + 2 * c + h]) + g, sizeof(uint16_t));
    std::memcpy(&r[i], pair, sizeof r[i]);
  }
  warp.arrive_and_wait();
}

// cp.async: the destination is poisoned when the copy is issued and the data lands only when
// a cp.async.wait_group lets it, so a kernel that reads a tile before waiting for it, or
// refills a buffer that another warp is still reading, reads NaNs here.
struct AsyncCopy {
  void* dst;
  const void* src;
  bool valid;
};
inline thread_local std::vector<AsyncCopy> open_group;
inline thread_local std::vector<std::vector<AsyncCopy>> committed_groups;

inline void cp_async_16(void* dst, const void* src, bool valid) {
  const auto* byte = static_cast<unsigned char*>(dst);
  if (reinterpret_cast<uintptr_t>(dst) % 16 != 0 || reinterpret_cast<uintptr_t>(src) % 16 != 0 ||
      byte < dynamic_shared_memory || byte + 16 > dynamic_shared_memory + sizeof dynamic_shared_memory) {
    std::fprintf(stderr, "emulate.h: cp.async of 16 bytes needs aligned addresses and a shared destination\n");
    std::abort();
  }
  std::memset(dst, 0xff, 16);
  open_group.push_back({dst, src, valid});
}
inline void cp_async_commit() {
  committed_groups.push_back(std::move(open_group));
  open_group.clear();
}
inline void cp_async_wait(int pending) {
  while (int(committed_groups.size()) > pending) {
    for (const AsyncCopy& copy : committed_groups.front()) {
      if (copy.valid) std::memcpy(copy.dst, copy.src, 16);
      else std::memset(copy.dst, 0, 16);
    }
    committed_groups.erase(committed_groups.begin());
  }
}

}  // namespace emu

namespace nvcuda::wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

// Only 16x16x16 is emulated: x[r][c] is the tile (A: M x K, B: K x N, accumulator: M x N).
template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "emulate.h has 16x16x16 fragments only");
  float x[16][16];
};

template <class Use, class T, class Layout>
void fill_fragment(fragment<Use, 16, 16, 16, T, Layout>& f, float value) {
  for (auto& row : f.x)
    for (float& e : row) e = value;
}

// A and B: element (r, c) of the tile at p[r·ldm + c] when row-major, p[c·ldm + r] when column-major.
template <class Use, class T, class Layout>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm) {
  static_assert(!std::is_same_v<Use, accumulator>, "accumulators load with a layout_t");
  constexpr bool row = std::is_same_v<Layout, row_major>;
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) f.x[r][c] = static_cast<float>(row ? p[r * ldm + c] : p[c * ldm + r]);
}

inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p, unsigned ldm, layout_t l) {
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) f.x[r][c] = l == mem_row_major ? p[r * ldm + c] : p[c * ldm + r];
}

// Lane 0 writes the tile; the other lanes see it after the kernel's own __syncwarp, as on a GPU.
inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm, layout_t l) {
  if (threadIdx.x % 32 != 0) return;
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) (l == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = f.x[r][c];
}

template <class T, class LA, class LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, LA>& a,
              const fragment<matrix_b, 16, 16, 16, T, LB>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
  fragment<accumulator, 16, 16, 16, float> result;
  for (int r = 0; r < 16; ++r)
    for (int n = 0; n < 16; ++n) {
      float acc = c.x[r][n];
      for (int k = 0; k < 16; ++k) acc += a.x[r][k] * b.x[k][n];
      result.x[r][n] = acc;
    }
  d = result;
}

}  // namespace nvcuda::wmma
