// The general CUDA attention kernels, flash-style: K/V tiles staged in shared memory, an
// online softmax in fp32, the logsumexp saved for the backward pass and the probabilities
// recomputed there; the (T·S)² score matrix never exists. The three modes read
// (B, T, S, heads, head_dim) through strides, exactly as the CPU kernels do
// (cpu/attention.h): a "sequence" is one (batch, head) for full, one (batch, frame, head) for
// spatial, one (batch, position, head) for temporal. Launched from attention_launch_impl.cuh;
// also run on the CPU by tests/cuda_emulation.
//
// CUDA cores: head_dim / 32 threads own one query row (forward_kernel, grad_q_kernel) or one
// key row (grad_kv_kernel), 32 of its values each in registers. Tensor cores (fp16/bf16, head_dim
// 64/128, sm_80+): mma_forward_kernel, mma_grad_q_kernel and mma_grad_kv_kernel on mma.sync
// with register accumulators (flash-attention-2's scheme), and wmma_forward_kernel (WMMA,
// accumulator in shared memory) for rows that are not 16-byte aligned.
#pragma once

#if defined(__CUDACC__)
#include <mma.h>
#endif

#include <cstdint>
#include <type_traits>

#include "cuda/attention_common.cuh"
#include "cuda/kernels.h"

namespace skyloom::cuda::flash {

// Token i of a sequence sits at base + (i / inner_len)·outer + (i % inner_len)·inner.
struct SeqView {
  int64_t base, outer, inner, inner_len;
  __device__ __forceinline__ int64_t offset(int64_t i) const {
    return base + (i / inner_len) * outer + (i % inner_len) * inner;
  }
};

struct Problem {
  int mode;  // cpu::AttentionMode
  bool causal;
  float scale;
  const int64_t* valid_lengths;  // device, (B,) or null
  int64_t B, T, S, heads, L, groups;

  __device__ SeqView view(const Strides& st, int64_t group, int64_t head) const {
    const int64_t* s = st.s;
    if (mode == int(cpu::AttentionMode::kFull)) return {group * s[0] + head * s[3], s[1], s[2], S};
    if (mode == int(cpu::AttentionMode::kSpatial))
      return {(group / T) * s[0] + (group % T) * s[1] + head * s[3], 0, s[2], S};
    return {(group / S) * s[0] + (group % S) * s[2] + head * s[3], 0, s[1], T};
  }
  // keys [0, limit) are visible to query row i
  __device__ int64_t key_limit(int64_t group, int64_t i) const {
    int64_t limit = L;
    const bool full = mode == int(cpu::AttentionMode::kFull);
    const int64_t frame_len = full ? S : 1;
    if (causal && mode != int(cpu::AttentionMode::kSpatial)) limit = (i / frame_len + 1) * frame_len;
    if (valid_lengths && full) {
      int64_t frames = valid_lengths[group];
      frames = frames < 0 ? 0 : (frames > T ? T : frames);
      limit = min(limit, frames * S);
    }
    return limit;
  }
};

// Split a 1-D block index into (tile, head, group): grid.x has no 65535 limit.
struct BlockCoords {
  int64_t tile, head, group;
};
__device__ __forceinline__ BlockCoords block_coords(int64_t tiles, int64_t heads) {
  const int64_t b = blockIdx.x;
  return {b % tiles, (b / tiles) % heads, b / tiles / heads};
}

// The largest of the block's threads' key limits: how far its K/V tiles must go. Every
// thread of the block calls it (it holds two barriers).
__device__ __forceinline__ int64_t block_key_end(int64_t limit) {
  __shared__ int key_end;
  if (threadIdx.x == 0) key_end = 0;
  __syncthreads();
  atomicMax(&key_end, int(limit));
  __syncthreads();
  return key_end;
}

// ---- CUDA-core kernels --------------------------------------------------------------------
// A row (a query row in forward_kernel and grad_q_kernel, a key row in grad_kv_kernel) is
// split between Core<D>::kParts = D / 32 adjacent threads, each holding 32 of its values in
// registers: 4-value chunks interleaved, chunk c of part p at element (c·kParts + p)·4, so the
// parts of a row read adjacent 16-byte words of a shared-memory row (float4 loads, no bank
// conflicts), and dot products finish with row_sum. A whole head_dim-128 row a thread spilled
// 0.4 to 2.3 KB a thread (ptxas, sm_90a).
template <int D>
struct Core {
  static_assert(D % 32 == 0, "head_dim must be a multiple of 32");
  static constexpr int kParts = D / 32;             // threads per row: 1, 2 or 4
  static constexpr int kValues = 32;                // a thread's share of a row
  static constexpr int kThreads = 256;              // per forward / dQ block
  static constexpr int kRows = kThreads / kParts;   // query rows per forward / dQ block
  static constexpr int kKeyRows = 32;               // key rows per dK/dV block
  static constexpr int kKeyThreads = kKeyRows * kParts;
  __device__ static int element(int part, int i) { return ((i / 4) * kParts + part) * 4 + i % 4; }
};

using Part = float[Core<32>::kValues];

constexpr int kKeys = 32;   // keys per shared-memory tile
constexpr int kQTile = 8;   // query rows per shared-memory tile in the dK/dV kernel

// This thread's share of a row at src + offset, times mul; zeros where !active.
template <class T, int D>
__device__ __forceinline__ void load_part(const T* src, int64_t offset, int part, bool active, float mul, Part& x) {
#pragma unroll
  for (int i = 0; i < Core<D>::kValues; ++i)
    x[i] = active ? to_float(src[offset + Core<D>::element(part, i)]) * mul : 0.f;
}

template <class T, int D>
__device__ __forceinline__ void store_part(T* dst, int64_t offset, int part, const Part& x, float mul) {
#pragma unroll
  for (int i = 0; i < Core<D>::kValues; ++i) dst[offset + Core<D>::element(part, i)] = from_float<T>(x[i] * mul);
}

// This thread's share of x · row, row being D floats of shared memory, 16-byte aligned.
template <int D>
__device__ __forceinline__ float dot_part(const Part& x, const float* row, int part) {
  float acc = 0.f;
#pragma unroll
  for (int c = 0; c < Core<D>::kValues / 4; ++c) {
    const float4 r = reinterpret_cast<const float4*>(row)[c * Core<D>::kParts + part];
    acc += x[4 * c] * r.x + x[4 * c + 1] * r.y + x[4 * c + 2] * r.z + x[4 * c + 3] * r.w;
  }
  return acc;
}

// acc += a · row, on this thread's share
template <int D>
__device__ __forceinline__ void axpy_part(Part& acc, float a, const float* row, int part) {
#pragma unroll
  for (int c = 0; c < Core<D>::kValues / 4; ++c) {
    const float4 r = reinterpret_cast<const float4*>(row)[c * Core<D>::kParts + part];
    acc[4 * c] += a * r.x, acc[4 * c + 1] += a * r.y, acc[4 * c + 2] += a * r.z, acc[4 * c + 3] += a * r.w;
  }
}

// Where a CUDA-core thread sits: its block's (tile, head, group), its row (rows_per_block to a
// block) and its part of that row.
struct CoreCoords {
  BlockCoords block;
  int64_t row;
  bool active;  // row < L
  int part;
  unsigned lanes;  // the row's lanes, for row_sum
};

template <int D>
__device__ __forceinline__ CoreCoords core_coords(const Problem& p, int rows_per_block) {
  CoreCoords c;
  c.block = block_coords((p.L + rows_per_block - 1) / rows_per_block, p.heads);
  c.row = c.block.tile * rows_per_block + threadIdx.x / Core<D>::kParts;
  c.active = c.row < p.L;
  c.part = threadIdx.x % Core<D>::kParts;
  c.lanes = row_lanes<Core<D>::kParts>();
  return c;
}

template <class T, int D>
__device__ __forceinline__ void load_tile(const T* src, const SeqView& view, int64_t k0, int64_t L, float (*dst)[D]) {
  for (int idx = threadIdx.x; idx < kKeys * D; idx += blockDim.x) {
    const int j = idx / D, d = idx % D;
    const int64_t key = k0 + j;
    dst[j][d] = key < L ? to_float(src[view.offset(key) + d]) : 0.f;
  }
}

template <class T, int D>
__global__ void __launch_bounds__(Core<D>::kThreads) forward_kernel(Problem p, const T* __restrict__ q, Strides qs,
                                                                   const T* __restrict__ k, Strides ks,
                                                                   const T* __restrict__ v, Strides vs,
                                                                   T* __restrict__ out, Strides os,
                                                                   float* __restrict__ lse, Strides ls) {
  using C = Core<D>;
  __shared__ __align__(16) float k_tile[kKeys][D];
  __shared__ __align__(16) float v_tile[kKeys][D];
  const auto [bc, i, active, part, lanes] = core_coords<D>(p, C::kRows);
  const SeqView qv = p.view(qs, bc.group, bc.head), kv = p.view(ks, bc.group, bc.head),
                vv = p.view(vs, bc.group, bc.head);

  Part qr, o;
  load_part<T, D>(q, active ? qv.offset(i) : 0, part, active, p.scale * kLog2e, qr);  // log2 units: exp2f is cheap
#pragma unroll
  for (int d = 0; d < C::kValues; ++d) o[d] = 0.f;
  const int64_t limit = active ? p.key_limit(bc.group, i) : 0;
  const int64_t key_end = block_key_end(limit);

  float m = -INFINITY, l = 0.f;
  for (int64_t k0 = 0; k0 < key_end; k0 += kKeys) {
    load_tile<T, D>(k, kv, k0, p.L, k_tile);
    load_tile<T, D>(v, vv, k0, p.L, v_tile);
    __syncthreads();
    const int64_t visible = limit - k0 < 0 ? 0 : (limit - k0 > kKeys ? kKeys : limit - k0);
    if (visible > 0) {  // the same for all parts of a row, as row_sum needs
      float s[kKeys];   // unrolled by 2 only, to keep compile times sane; s lives in L1-backed local memory
      float m_new = m;
#pragma unroll 2
      for (int j = 0; j < kKeys; ++j) {
        const float acc = row_sum<C::kParts>(dot_part<D>(qr, k_tile[j], part), lanes);
        s[j] = j < visible ? acc : -INFINITY;
        m_new = fmaxf(m_new, s[j]);
      }
      const float alpha = exp2f(m - m_new);
      l *= alpha;
#pragma unroll
      for (int d = 0; d < C::kValues; ++d) o[d] *= alpha;
#pragma unroll 2
      for (int j = 0; j < kKeys; ++j) {
        const float pj = exp2f(s[j] - m_new);
        l += pj;
        axpy_part<D>(o, pj, v_tile[j], part);
      }
      m = m_new;
    }
    __syncthreads();
  }
  if (!active) return;
  const SeqView ov = p.view(os, bc.group, bc.head), lv = p.view(ls, bc.group, bc.head);
  store_part<T, D>(out, ov.offset(i), part, o, l > 0.f ? 1.f / l : 0.f);
  if (part == 0) lse[lv.offset(i)] = l > 0.f ? (m + log2f(l)) * kLn2 : INFINITY;
}

// delta_i = rowsum(grad_out_i ∘ out_i), the softmax-Jacobian term of every backward row.
template <class T, int D>
__global__ void delta_kernel(Problem p, const T* __restrict__ go, Strides gs, const T* __restrict__ out, Strides os,
                             float* __restrict__ delta, Strides ds, int64_t rows) {
  const int64_t r = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (r >= rows) return;
  const int64_t i = r % p.L, head = (r / p.L) % p.heads, group = r / p.L / p.heads;
  const int64_t g = p.view(gs, group, head).offset(i), o = p.view(os, group, head).offset(i);
  float acc = 0.f;
#pragma unroll
  for (int d = 0; d < D; ++d) acc += to_float(go[g + d]) * to_float(out[o + d]);
  delta[p.view(ds, group, head).offset(i)] = acc;
}

template <class T, int D>
__global__ void __launch_bounds__(Core<D>::kThreads) grad_q_kernel(Problem p, const T* __restrict__ go, Strides gs,
                                                                  const T* __restrict__ q, Strides qs,
                                                                  const T* __restrict__ k, Strides ks,
                                                                  const T* __restrict__ v, Strides vs,
                                                                  const float* __restrict__ lse, Strides ls,
                                                                  const float* __restrict__ delta, Strides ds,
                                                                  T* __restrict__ grad_q, Strides dqs) {
  using C = Core<D>;
  __shared__ __align__(16) float k_tile[kKeys][D];
  __shared__ __align__(16) float v_tile[kKeys][D];
  const auto [bc, i, active, part, lanes] = core_coords<D>(p, C::kRows);
  const SeqView qv = p.view(qs, bc.group, bc.head), kv = p.view(ks, bc.group, bc.head),
                vv = p.view(vs, bc.group, bc.head), gv = p.view(gs, bc.group, bc.head);
  Part qr, gr, dq;
  load_part<T, D>(q, active ? qv.offset(i) : 0, part, active, p.scale, qr);
  load_part<T, D>(go, active ? gv.offset(i) : 0, part, active, 1.f, gr);
#pragma unroll
  for (int d = 0; d < C::kValues; ++d) dq[d] = 0.f;
  const float lse2 = active ? lse[p.view(ls, bc.group, bc.head).offset(i)] * kLog2e : 0.f;
  const float di = active ? delta[p.view(ds, bc.group, bc.head).offset(i)] : 0.f;
  const int64_t limit = active ? p.key_limit(bc.group, i) : 0;
  const int64_t key_end = block_key_end(limit);
  for (int64_t k0 = 0; k0 < key_end; k0 += kKeys) {
    load_tile<T, D>(k, kv, k0, p.L, k_tile);
    load_tile<T, D>(v, vv, k0, p.L, v_tile);
    __syncthreads();
    const int64_t visible = limit - k0 < 0 ? 0 : (limit - k0 > kKeys ? kKeys : limit - k0);
    for (int j = 0; j < visible; ++j) {
      const float s = row_sum<C::kParts>(dot_part<D>(qr, k_tile[j], part), lanes);
      const float dp = row_sum<C::kParts>(dot_part<D>(gr, v_tile[j], part), lanes);
      axpy_part<D>(dq, exp2f(s * kLog2e - lse2) * (dp - di), k_tile[j], part);
    }
    __syncthreads();
  }
  if (!active) return;
  store_part<T, D>(grad_q, p.view(dqs, bc.group, bc.head).offset(i), part, dq, p.scale);
}

// A block owns kKeyRows key rows, their K and V values and dK, dV accumulators in registers,
// and walks every query row in kQTile-row shared-memory tiles.
template <class T, int D>
__global__ void __launch_bounds__(Core<D>::kKeyThreads) grad_kv_kernel(Problem p, const T* __restrict__ go, Strides gs,
                                                                      const T* __restrict__ q, Strides qs,
                                                                      const T* __restrict__ k, Strides ks,
                                                                      const T* __restrict__ v, Strides vs,
                                                                      const float* __restrict__ lse, Strides ls,
                                                                      const float* __restrict__ delta, Strides ds,
                                                                      T* __restrict__ grad_k, Strides dks,
                                                                      T* __restrict__ grad_v, Strides dvs) {
  using C = Core<D>;
  __shared__ __align__(16) float q_tile[kQTile][D];
  __shared__ __align__(16) float go_tile[kQTile][D];
  __shared__ float lse2_tile[kQTile], delta_tile[kQTile];
  __shared__ int64_t limit_tile[kQTile];
  const auto [bc, key, active, part, lanes] = core_coords<D>(p, C::kKeyRows);
  const int64_t first_key = bc.tile * C::kKeyRows;
  const SeqView qv = p.view(qs, bc.group, bc.head), kv = p.view(ks, bc.group, bc.head),
                vv = p.view(vs, bc.group, bc.head), gv = p.view(gs, bc.group, bc.head),
                lv = p.view(ls, bc.group, bc.head), dv = p.view(ds, bc.group, bc.head);
  Part kr, vr, dk, dvr;
  load_part<T, D>(k, active ? kv.offset(key) : 0, part, active, 1.f, kr);
  load_part<T, D>(v, active ? vv.offset(key) : 0, part, active, 1.f, vr);
#pragma unroll
  for (int d = 0; d < C::kValues; ++d) dk[d] = dvr[d] = 0.f;
  for (int64_t r0 = 0; r0 < p.L; r0 += kQTile) {
    __syncthreads();
    for (int idx = threadIdx.x; idx < kQTile * D; idx += blockDim.x) {
      const int r = idx / D, d = idx % D;
      const int64_t row = r0 + r;
      q_tile[r][d] = row < p.L ? to_float(q[qv.offset(row) + d]) * p.scale : 0.f;
      go_tile[r][d] = row < p.L ? to_float(go[gv.offset(row) + d]) : 0.f;
    }
    if (threadIdx.x < kQTile) {
      const int64_t row = r0 + threadIdx.x;
      lse2_tile[threadIdx.x] = row < p.L ? lse[lv.offset(row)] * kLog2e : 0.f;
      delta_tile[threadIdx.x] = row < p.L ? delta[dv.offset(row)] : 0.f;
      limit_tile[threadIdx.x] = row < p.L ? p.key_limit(bc.group, row) : 0;
    }
    __syncthreads();
    int64_t tile_limit = 0;
    for (int r = 0; r < kQTile; ++r) tile_limit = max(tile_limit, limit_tile[r]);
    if (tile_limit <= first_key) continue;  // no row of this tile sees any key of this block (uniform)
    for (int r = 0; r < kQTile; ++r) {
      if (!active || key >= limit_tile[r]) continue;  // the same for all parts of a row
      const float s = row_sum<C::kParts>(dot_part<D>(kr, q_tile[r], part), lanes);
      const float dp = row_sum<C::kParts>(dot_part<D>(vr, go_tile[r], part), lanes);
      const float pij = exp2f(s * kLog2e - lse2_tile[r]);
      axpy_part<D>(dvr, pij, go_tile[r], part);
      axpy_part<D>(dk, pij * (dp - delta_tile[r]), q_tile[r], part);  // q_tile already holds scale·q
    }
  }
  if (!active) return;
  store_part<T, D>(grad_k, p.view(dks, bc.group, bc.head).offset(key), part, dk, 1.f);
  store_part<T, D>(grad_v, p.view(dvs, bc.group, bc.head).offset(key), part, dvr, 1.f);
}

// ---- tensor-core forward ------------------------------------------------------------------
// A block owns 64 query rows; warp w owns rows [16w, 16w+16). Per 64-key tile:
//   S = Q·Kᵀ (WMMA, fp32) -> masked online softmax on the warp's rows in shared memory
//   (scores scaled to log2 units, exp2f) -> P in T -> O (fp32, shared) rescaled by alpha
//   -> O += P·V (WMMA, accumulators loaded from and stored back to shared memory).
constexpr int kWmmaRows = 64, kWmmaKeys = 64, kWmmaWarps = 4;

template <class T, int D>
struct WmmaSmem {
  static constexpr size_t q = 0;
  static constexpr size_t k = q + kWmmaRows * D * sizeof(T);
  static constexpr size_t v = k + kWmmaKeys * D * sizeof(T);
  static constexpr size_t s = v + kWmmaKeys * D * sizeof(T);
  static constexpr size_t p = s + kWmmaRows * kWmmaKeys * sizeof(float);
  static constexpr size_t o = p + kWmmaRows * kWmmaKeys * sizeof(T);
  static constexpr size_t m = o + kWmmaRows * D * sizeof(float);
  static constexpr size_t l = m + kWmmaRows * sizeof(float);
  static constexpr size_t limit = l + kWmmaRows * sizeof(float);
  static constexpr size_t bytes = limit + kWmmaRows * sizeof(int);
};

template <class T, int D>
__global__ void __launch_bounds__(32 * kWmmaWarps) wmma_forward_kernel(
    Problem p, const T* __restrict__ q, Strides qs, const T* __restrict__ k, Strides ks, const T* __restrict__ v,
    Strides vs, T* __restrict__ out, Strides os, float* __restrict__ lse, Strides ls) {
#if (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800) || defined(SKYLOOM_CUDA_EMULATION)
  using namespace nvcuda;
  using L = WmmaSmem<T, D>;
  SKYLOOM_DYNAMIC_SHARED_MEMORY(smem);
  T* q_s = reinterpret_cast<T*>(smem + L::q);
  T* k_s = reinterpret_cast<T*>(smem + L::k);
  T* v_s = reinterpret_cast<T*>(smem + L::v);
  float* s_s = reinterpret_cast<float*>(smem + L::s);
  T* p_s = reinterpret_cast<T*>(smem + L::p);
  float* o_s = reinterpret_cast<float*>(smem + L::o);
  float* m_s = reinterpret_cast<float*>(smem + L::m);
  float* l_s = reinterpret_cast<float*>(smem + L::l);
  int* limit_s = reinterpret_cast<int*>(smem + L::limit);

  const int64_t tiles = (p.L + kWmmaRows - 1) / kWmmaRows;
  const BlockCoords bc = block_coords(tiles, p.heads);
  const int64_t row0 = bc.tile * kWmmaRows;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const SeqView qv = p.view(qs, bc.group, bc.head), kv = p.view(ks, bc.group, bc.head),
                vv = p.view(vs, bc.group, bc.head);
  const T zero = from_float<T>(0.f);

  int64_t most = 0;
  for (int r = tid; r < kWmmaRows; r += blockDim.x) {
    const int64_t i = row0 + r;
    const int lim = i < p.L ? int(p.key_limit(bc.group, i)) : 0;
    limit_s[r] = lim;
    m_s[r] = -INFINITY;
    l_s[r] = 0.f;
    most = max(most, int64_t(lim));
  }
  const int64_t key_end = block_key_end(most);
  for (int idx = tid; idx < kWmmaRows * D; idx += blockDim.x) {
    const int r = idx / D, d = idx % D;
    const int64_t i = row0 + r;
    q_s[idx] = i < p.L ? q[qv.offset(i) + d] : zero;
    o_s[idx] = 0.f;
  }
  __syncthreads();

  const float score_scale = p.scale * kLog2e;
  T* p_w = p_s + warp * 16 * kWmmaKeys;
  float* s_w = s_s + warp * 16 * kWmmaKeys;
  float* o_w = o_s + warp * 16 * D;
  for (int64_t k0 = 0; k0 < key_end; k0 += kWmmaKeys) {
    for (int idx = tid; idx < kWmmaKeys * D; idx += blockDim.x) {
      const int j = idx / D, d = idx % D;
      const int64_t key = k0 + j;
      k_s[idx] = key < p.L ? k[kv.offset(key) + d] : zero;
      v_s[idx] = key < p.L ? v[vv.offset(key) + d] : zero;
    }
    __syncthreads();

    // S (16 x 64 per warp) = Q_w (16 x D) · Kᵀ (D x 64); Kᵀ is K read column-major.
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kWmmaKeys / 16];
#pragma unroll
    for (int c = 0; c < kWmmaKeys / 16; ++c) wmma::fill_fragment(acc[c], 0.f);
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
      wmma::load_matrix_sync(a, q_s + warp * 16 * D + kk * 16, D);
#pragma unroll
      for (int c = 0; c < kWmmaKeys / 16; ++c) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
        wmma::load_matrix_sync(b, k_s + c * 16 * D + kk * 16, D);
        wmma::mma_sync(acc[c], a, b, acc[c]);
      }
    }
#pragma unroll
    for (int c = 0; c < kWmmaKeys / 16; ++c)
      wmma::store_matrix_sync(s_w + c * 16, acc[c], kWmmaKeys, wmma::mem_row_major);
    __syncwarp();

    // Online softmax, one row at a time across the warp: each lane holds 2 of the 64 scores.
    for (int r = 0; r < 16; ++r) {
      const int row = warp * 16 + r;
      const int64_t visible = limit_s[row] - k0;
      float x[2];
      float mx = -INFINITY;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int j = lane + 32 * h;
        x[h] = j < visible ? s_w[r * kWmmaKeys + j] * score_scale : -INFINITY;
        mx = fmaxf(mx, x[h]);
      }
#pragma unroll
      for (int off = 16; off > 0; off /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
      const float m_old = m_s[row];
      const float m_new = fmaxf(m_old, mx);
      float alpha = 1.f, sum = 0.f;
      if (m_new != -INFINITY) {
        alpha = exp2f(m_old - m_new);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          x[h] = exp2f(x[h] - m_new);
          sum += x[h];
        }
      } else {
        x[0] = x[1] = 0.f;
      }
#pragma unroll
      for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
#pragma unroll
      for (int h = 0; h < 2; ++h) p_w[r * kWmmaKeys + lane + 32 * h] = from_float<T>(x[h]);
      for (int d = lane; d < D; d += 32) o_w[r * D + d] *= alpha;
      __syncwarp();
      if (lane == 0) {
        m_s[row] = m_new;
        l_s[row] = l_s[row] * alpha + sum;
      }
      __syncwarp();
    }

    // O_w (16 x D) += P_w (16 x 64) · V (64 x D), accumulating in place in shared memory.
#pragma unroll
    for (int n = 0; n < D / 16; ++n) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> o_frag;
      wmma::load_matrix_sync(o_frag, o_w + n * 16, D, wmma::mem_row_major);
#pragma unroll
      for (int kk = 0; kk < kWmmaKeys / 16; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
        wmma::load_matrix_sync(a, p_w + kk * 16, kWmmaKeys);
        wmma::load_matrix_sync(b, v_s + kk * 16 * D + n * 16, D);
        wmma::mma_sync(o_frag, a, b, o_frag);
      }
      wmma::store_matrix_sync(o_w + n * 16, o_frag, D, wmma::mem_row_major);
    }
    __syncthreads();  // before the next tile overwrites K/V
  }

  const SeqView ov = p.view(os, bc.group, bc.head), lv = p.view(ls, bc.group, bc.head);
  for (int idx = tid; idx < kWmmaRows * D; idx += blockDim.x) {
    const int r = idx / D, d = idx % D;
    const int64_t i = row0 + r;
    if (i >= p.L) continue;
    const float l = l_s[r];
    out[ov.offset(i) + d] = from_float<T>(l > 0.f ? o_s[idx] / l : 0.f);
    if (d == 0) lse[lv.offset(i)] = l > 0.f ? (m_s[r] + log2f(l)) * kLn2 : INFINITY;
  }
#endif
}

// ---- tensor-core forward, mma.sync ---------------------------------------------------------
// flash-attention-2's forward: warp w of a block owns kTiles 16-row tiles of query rows, and
// lane (g = lane / 4, c = lane % 4) holds rows g and g + 8 of each. Q stays in registers as
// mma A fragments; per 64-key tile in shared memory (double-buffered with cp.async, so the
// next tile loads while this one is used: for_each_key_tile), S = Q·Kᵀ lands in registers (8
// tiles of 16 x 8 per row tile), the masked online softmax runs on those registers (a row's
// four lanes meet through two shuffles), and the C layout of S is the A layout of P, so
// O += P·V needs no data movement. O stays in registers (head_dim / 8 tiles of 16 x 8 per row
// tile). Each K and V fragment read from shared memory serves all kTiles row tiles: two for
// head_dim 64 halve those reads per row; head_dim 128 keeps one, as two would not fit in 255
// registers. Fragment layouts: PTX ISA, "Matrix Fragments for mma.m16n8k16".
constexpr int kMmaKeys = 64, kMmaWarps = 4;
constexpr int kMmaPad = 8;  // elements of padding per shared-memory row: rows 4 banks apart

template <class T, int D>
struct MmaTraits {
  static constexpr int kTiles = D == 64 ? 2 : 1;  // 16-row tiles per warp
  static constexpr int kRows = 16 * kTiles * kMmaWarps;  // query rows per block
  static constexpr int kRow = D + kMmaPad;
  static constexpr size_t smem_bytes = 2 * 2 * kMmaKeys * kRow * sizeof(T);  // two K and two V tiles
};

// Two 16-bit values as one 32-bit mma operand register, the first in the low half.
template <class T>
union Pair {
  uint32_t u;
  T h[2];
};

template <class T>
__device__ __forceinline__ uint32_t pack(float lo, float hi) {
  Pair<T> pair;
  pair.h[0] = from_float<T>(lo);
  pair.h[1] = from_float<T>(hi);
  return pair.u;
}

template <class T>
__device__ __forceinline__ uint32_t pack(T lo, T hi) {
  Pair<T> pair;
  pair.h[0] = lo;
  pair.h[1] = hi;
  return pair.u;
}

// d += A·B for one 16 x 8 x 16 tile, fp32 accumulation. a: row-major A; b: column-major B.
template <class T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(SKYLOOM_CUDA_EMULATION)
  emu::mma_m16n8k16<T>(d, a, b0, b1);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#endif
}

// r[i] = the transpose-read fragment of 8 x 8 matrix i, whose rows lanes 8i..8i+7 point at:
// lane (g, c) gets elements (2c, g) and (2c + 1, g), i.e. an mma B register read from a
// row-major K x N tile. Rows 16-byte aligned, in shared memory.
template <class T>
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const T* row) {
#if defined(SKYLOOM_CUDA_EMULATION)
  emu::ldmatrix_x4_trans(r, row);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
#endif
}

// Copies `rows` rows of a sequence from row `first` on (zeros past L) into shared memory rows
// row_stride elements apart, 16 bytes at a time.
template <class T, int D>
__device__ __forceinline__ void stage_tile(const T* __restrict__ src, const SeqView& view, int64_t first, int rows,
                                           int64_t L, T* dst, int row_stride) {
  constexpr int kChunks = D / 8;
  for (int idx = threadIdx.x; idx < rows * kChunks; idx += 32 * kMmaWarps) {
    const int r = idx / kChunks, ch = idx % kChunks;
    const int64_t i = first + r;
    uint4 chunk = make_uint4(0, 0, 0, 0);
    if (i < L) chunk = *reinterpret_cast<const uint4*>(src + view.offset(i) + ch * 8);
    *reinterpret_cast<uint4*>(dst + r * row_stride + ch * 8) = chunk;
  }
}

// cp.async: 16 bytes from global to shared memory without passing through registers, so a
// block can fetch its next K/V tile while it computes on the current one. valid false
// zero-fills (nothing is read). Completion is awaited in commit groups: cp_async_wait<N>()
// returns once at most N of this thread's committed groups are still in flight.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
#if defined(SKYLOOM_CUDA_EMULATION)
  emu::cp_async_16(dst, src, valid);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(address), "l"(src), "r"(valid ? 16 : 0)
               : "memory");
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(SKYLOOM_CUDA_EMULATION)
  emu::cp_async_commit();
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(SKYLOOM_CUDA_EMULATION)
  emu::cp_async_wait(N);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// stage_tile through cp.async: issued, not awaited.
template <class T, int D>
__device__ __forceinline__ void stage_tile_async(const T* __restrict__ src, const SeqView& view, int64_t first,
                                                 int rows, int64_t L, T* dst, int row_stride) {
  constexpr int kChunks = D / 8;
  for (int idx = threadIdx.x; idx < rows * kChunks; idx += 32 * kMmaWarps) {
    const int r = idx / kChunks, ch = idx % kChunks;
    const int64_t i = first + r;
    cp_async_16(dst + r * row_stride + ch * 8, i < L ? src + view.offset(i) + ch * 8 : src, i < L);
  }
}

// The key loop of the mma kernels, double-buffered: K and V of tile k0 + kMmaKeys are in
// flight while body(k0, k_tile, v_tile) computes on tile k0. smem holds two (K, V) buffers of
// kMmaKeys rows each, row_stride apart. Call with every thread of the block.
template <class T, int D, class Body>
__device__ __forceinline__ void for_each_key_tile(const T* __restrict__ k, const SeqView& kv, const T* __restrict__ v,
                                                  const SeqView& vv, int64_t L, int64_t key_end, T* smem,
                                                  int row_stride, Body body) {
  const int tile = kMmaKeys * row_stride;
  auto fetch = [&](int64_t k0, int buffer) {
    stage_tile_async<T, D>(k, kv, k0, kMmaKeys, L, smem + 2 * buffer * tile, row_stride);
    stage_tile_async<T, D>(v, vv, k0, kMmaKeys, L, smem + (2 * buffer + 1) * tile, row_stride);
    cp_async_commit();
  };
  if (key_end > 0) fetch(0, 0);
  int buffer = 0;
  for (int64_t k0 = 0; k0 < key_end; k0 += kMmaKeys, buffer ^= 1) {
    if (k0 + kMmaKeys < key_end) {
      fetch(k0 + kMmaKeys, buffer ^ 1);  // that buffer's last readers passed the barrier below
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();  // tile k0 is in shared memory for every thread
    body(k0, smem + 2 * buffer * tile, smem + (2 * buffer + 1) * tile);
    __syncthreads();  // every warp is done with this buffer before it is refilled
  }
}

// The A fragment of k-step kk for the 16 rows starting at `rows` (row-major, row_stride apart).
template <class T>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const T* rows, int row_stride, int kk, int g, int c) {
#pragma unroll
  for (int r = 0; r < 4; ++r)
    a[r] = *reinterpret_cast<const uint32_t*>(rows + (g + 8 * (r & 1)) * row_stride + 16 * kk + 8 * (r >> 1) +
                                              2 * c);
}

// Query rows need 16-byte-aligned starts (the launcher checks): Q is read 4 bytes at a time,
// K and V 16, and the output written 4.
template <class T, int D>
__global__ void __launch_bounds__(32 * kMmaWarps) mma_forward_kernel(
    Problem p, const T* __restrict__ q, Strides qs, const T* __restrict__ k, Strides ks, const T* __restrict__ v,
    Strides vs, T* __restrict__ out, Strides os, float* __restrict__ lse, Strides ls) {
#if (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800) || defined(SKYLOOM_CUDA_EMULATION)
  using L = MmaTraits<T, D>;
  constexpr int M = L::kTiles;
  SKYLOOM_DYNAMIC_SHARED_MEMORY(smem);

  const int64_t tiles = (p.L + L::kRows - 1) / L::kRows;
  const BlockCoords bc = block_coords(tiles, p.heads);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, c = lane % 4;
  const SeqView qv = p.view(qs, bc.group, bc.head), kv = p.view(ks, bc.group, bc.head),
                vv = p.view(vs, bc.group, bc.head);
  // Row h of row tile t of this lane: h = 0 is row g, h = 1 row g + 8.
  int64_t row[M][2], limit[M][2];
  int64_t most = 0;
#pragma unroll
  for (int t = 0; t < M; ++t)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      row[t][h] = bc.tile * L::kRows + (warp * M + t) * 16 + g + 8 * h;
      limit[t][h] = row[t][h] < p.L ? p.key_limit(bc.group, row[t][h]) : 0;
      most = max(most, limit[t][h]);
    }

  const int64_t key_end = block_key_end(most);

  // Q as A fragments: register r of k-step kk holds row g + 8·(r & 1), columns
  // 16·kk + 8·(r >> 1) + 2c and the next.
  uint32_t qa[M][D / 16][4];
#pragma unroll
  for (int t = 0; t < M; ++t)
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int64_t i = row[t][r & 1];
        const int col = 16 * kk + 8 * (r >> 1) + 2 * c;
        qa[t][kk][r] = i < p.L ? *reinterpret_cast<const uint32_t*>(q + qv.offset(i) + col) : 0u;
      }

  float o[M][D / 8][4];
  float m[M][2], l[M][2];  // l: this lane's share of the row sum
#pragma unroll
  for (int t = 0; t < M; ++t) {
#pragma unroll
    for (int n = 0; n < D / 8; ++n) o[t][n][0] = o[t][n][1] = o[t][n][2] = o[t][n][3] = 0.f;
    m[t][0] = m[t][1] = -INFINITY;
    l[t][0] = l[t][1] = 0.f;
  }
  const float score_scale = p.scale * kLog2e;
  const int matrix = lane / 8;  // the ldmatrix matrix this lane points into
  const int v_lane = (8 * (matrix & 1) + lane % 8) * L::kRow + 8 * (matrix >> 1);

  for_each_key_tile<T, D>(k, kv, v, vv, p.L, key_end, reinterpret_cast<T*>(smem), L::kRow,
                          [&](int64_t k0, const T* k_s, const T* v_s) {
    // S = Q·Kᵀ: tile j covers keys k0 + 8j .. +7; B = Kᵀ, so b (k = 2c, 2c+1; n = g) is a pair
    // of adjacent elements of key row 8j + g.
    float s[M][kMmaKeys / 8][4];
#pragma unroll
    for (int j = 0; j < kMmaKeys / 8; ++j) {
#pragma unroll
      for (int t = 0; t < M; ++t) s[t][j][0] = s[t][j][1] = s[t][j][2] = s[t][j][3] = 0.f;
      const T* key_row = k_s + (8 * j + g) * L::kRow + 2 * c;
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        const uint32_t b0 = *reinterpret_cast<const uint32_t*>(key_row + 16 * kk);
        const uint32_t b1 = *reinterpret_cast<const uint32_t*>(key_row + 16 * kk + 8);
#pragma unroll
        for (int t = 0; t < M; ++t) mma_16816<T>(s[t][j], qa[t][kk], b0, b1);
      }
    }

    // Masked online softmax in log2 units: s[t][j][e] is row h = e >> 1, key k0 + 8j + 2c + (e & 1).
#pragma unroll
    for (int t = 0; t < M; ++t)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float mx = -INFINITY;
#pragma unroll
        for (int j = 0; j < kMmaKeys / 8; ++j)
#pragma unroll
          for (int e = 2 * h; e < 2 * h + 2; ++e) {
            const int64_t key = k0 + 8 * j + 2 * c + (e & 1);
            s[t][j][e] = key < limit[t][h] ? s[t][j][e] * score_scale : -INFINITY;
            mx = fmaxf(mx, s[t][j][e]);
          }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(m[t][h], mx);
        const float alpha = m_new == -INFINITY ? 1.f : exp2f(m[t][h] - m_new);
        float sum = 0.f;
#pragma unroll
        for (int j = 0; j < kMmaKeys / 8; ++j)
#pragma unroll
          for (int e = 2 * h; e < 2 * h + 2; ++e) {
            s[t][j][e] = m_new == -INFINITY ? 0.f : exp2f(s[t][j][e] - m_new);
            sum += s[t][j][e];
          }
        l[t][h] = l[t][h] * alpha + sum;
        m[t][h] = m_new;
#pragma unroll
        for (int n = 0; n < D / 8; ++n) o[t][n][2 * h] *= alpha, o[t][n][2 * h + 1] *= alpha;
      }

    // O += P·V: P's A fragment for keys 16kk.. is S tiles 2kk and 2kk + 1. B = V pairs two
    // key rows of one column, which ldmatrix.trans reads for two O tiles at once: matrices
    // (keys 16kk.. / 16kk+8.., columns 8n.. / 8n+8..), lane l pointing at row l % 8 of matrix l / 8.
#pragma unroll
    for (int kk = 0; kk < kMmaKeys / 16; ++kk) {
      uint32_t pa[M][4];
#pragma unroll
      for (int t = 0; t < M; ++t) {
        pa[t][0] = pack<T>(s[t][2 * kk][0], s[t][2 * kk][1]);
        pa[t][1] = pack<T>(s[t][2 * kk][2], s[t][2 * kk][3]);
        pa[t][2] = pack<T>(s[t][2 * kk + 1][0], s[t][2 * kk + 1][1]);
        pa[t][3] = pack<T>(s[t][2 * kk + 1][2], s[t][2 * kk + 1][3]);
      }
#pragma unroll
      for (int n = 0; n < D / 8; n += 2) {
        uint32_t b[4];
        ldmatrix_x4_trans(b, v_s + v_lane + 16 * kk * L::kRow + 8 * n);
#pragma unroll
        for (int t = 0; t < M; ++t) {
          mma_16816<T>(o[t][n], pa[t], b[0], b[1]);
          mma_16816<T>(o[t][n + 1], pa[t], b[2], b[3]);
        }
      }
    }
  });

  const SeqView ov = p.view(os, bc.group, bc.head), lv = p.view(ls, bc.group, bc.head);
#pragma unroll
  for (int t = 0; t < M; ++t)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float total = l[t][h];
      total += __shfl_xor_sync(0xffffffffu, total, 1);
      total += __shfl_xor_sync(0xffffffffu, total, 2);
      if (row[t][h] >= p.L) continue;
      const float inv = total > 0.f ? 1.f / total : 0.f;
      T* out_row = out + ov.offset(row[t][h]) + 2 * c;
#pragma unroll
      for (int n = 0; n < D / 8; ++n)
        *reinterpret_cast<uint32_t*>(out_row + 8 * n) = pack<T>(o[t][n][2 * h] * inv, o[t][n][2 * h + 1] * inv);
      if (c == 0) lse[lv.offset(row[t][h])] = total > 0.f ? (m[t][h] + log2f(total)) * kLn2 : INFINITY;
    }
#endif
}

// ---- tensor-core backward, mma.sync ----------------------------------------------------------
// Two kernels after delta_kernel, in the fragment scheme of the forward, each with one side of
// the product in registers and no atomics: mma_grad_q_kernel walks key tiles for 16 query rows
// a warp (S = Q·Kᵀ and dP = dO·Vᵀ in registers, dS = P ∘ (dP − delta), dQ += dS·K), and
// mma_grad_kv_kernel walks query tiles for 16 key rows a warp (Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ,
// dV += Pᵀ·dO, dK += dSᵀ·Q). S and dP are computed twice, 7 matrix products where
// flash-attention-2 does 5 with dQ added atomically; in return neither kernel needs a
// transpose, a workspace or atomics. Prefix masks are non-decreasing in the query index, so a
// query tile whose last row sees none of a block's keys is skipped whole.
constexpr int kBwdQueries = 32;  // query rows per tile of mma_grad_kv_kernel

template <class T, int D>
struct MmaBackwardTraits {
  static constexpr int kRow = D + kMmaPad;
  static constexpr int kQueryRows = 16 * kMmaWarps;  // per mma_grad_q_kernel block
  static constexpr int kKeyRows = 16 * kMmaWarps;    // per mma_grad_kv_kernel block
  static constexpr size_t grad_q_smem = 2 * 2 * kMmaKeys * kRow * sizeof(T);  // two K and two V tiles
  // K and V of the block's keys, Q and dO of a query tile, then lse (log2 units), delta, limit
  static constexpr size_t grad_kv_smem = (2 * kKeyRows + 2 * kBwdQueries) * kRow * sizeof(T) +
                                         kBwdQueries * (2 * sizeof(float) + sizeof(int64_t));
};

template <class T, int D>
__global__ void __launch_bounds__(32 * kMmaWarps) mma_grad_q_kernel(
    Problem p, const T* __restrict__ go, Strides gs, const T* __restrict__ q, Strides qs, const T* __restrict__ k,
    Strides ks, const T* __restrict__ v, Strides vs, const float* __restrict__ lse, Strides ls,
    const float* __restrict__ delta, Strides ds, T* __restrict__ grad_q, Strides dqs) {
#if (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800) || defined(SKYLOOM_CUDA_EMULATION)
  using L = MmaBackwardTraits<T, D>;
  SKYLOOM_DYNAMIC_SHARED_MEMORY(smem);

  const int64_t tiles = (p.L + L::kQueryRows - 1) / L::kQueryRows;
  const BlockCoords bc = block_coords(tiles, p.heads);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, c = lane % 4;
  const SeqView qv = p.view(qs, bc.group, bc.head), kv = p.view(ks, bc.group, bc.head),
                vv = p.view(vs, bc.group, bc.head), gv = p.view(gs, bc.group, bc.head);
  int64_t row[2], limit[2];
  float lse2[2], delta_row[2];
  for (int h = 0; h < 2; ++h) {
    row[h] = bc.tile * L::kQueryRows + warp * 16 + g + 8 * h;
    const bool valid = row[h] < p.L;
    limit[h] = valid ? p.key_limit(bc.group, row[h]) : 0;
    lse2[h] = valid ? lse[p.view(ls, bc.group, bc.head).offset(row[h])] * kLog2e : 0.f;
    delta_row[h] = valid ? delta[p.view(ds, bc.group, bc.head).offset(row[h])] : 0.f;
  }
  const int64_t key_end = block_key_end(max(limit[0], limit[1]));

  uint32_t qa[D / 16][4], ga[D / 16][4];  // Q and dO as A fragments
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk)
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int64_t i = row[r & 1];
      const int col = 16 * kk + 8 * (r >> 1) + 2 * c;
      qa[kk][r] = i < p.L ? *reinterpret_cast<const uint32_t*>(q + qv.offset(i) + col) : 0u;
      ga[kk][r] = i < p.L ? *reinterpret_cast<const uint32_t*>(go + gv.offset(i) + col) : 0u;
    }
  float dq[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n) dq[n][0] = dq[n][1] = dq[n][2] = dq[n][3] = 0.f;
  const float score_scale = p.scale * kLog2e;
  const int matrix = lane / 8;
  const int k_lane = (8 * (matrix & 1) + lane % 8) * L::kRow + 8 * (matrix >> 1);

  for_each_key_tile<T, D>(k, kv, v, vv, p.L, key_end, reinterpret_cast<T*>(smem), L::kRow,
                          [&](int64_t k0, const T* k_s, const T* v_s) {
    // S = Q·Kᵀ and dP = dO·Vᵀ, tile j = keys k0 + 8j ..; then dS in place of S.
    float s[kMmaKeys / 8][4], dp[kMmaKeys / 8][4];
#pragma unroll
    for (int j = 0; j < kMmaKeys / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[j][e] = dp[j][e] = 0.f;
      const T* key_row = k_s + (8 * j + g) * L::kRow + 2 * c;
      const T* value_row = v_s + (8 * j + g) * L::kRow + 2 * c;
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        mma_16816<T>(s[j], qa[kk], *reinterpret_cast<const uint32_t*>(key_row + 16 * kk),
                     *reinterpret_cast<const uint32_t*>(key_row + 16 * kk + 8));
        mma_16816<T>(dp[j], ga[kk], *reinterpret_cast<const uint32_t*>(value_row + 16 * kk),
                     *reinterpret_cast<const uint32_t*>(value_row + 16 * kk + 8));
      }
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int h = e >> 1;
        const int64_t key = k0 + 8 * j + 2 * c + (e & 1);
        const float pij = key < limit[h] ? exp2f(s[j][e] * score_scale - lse2[h]) : 0.f;
        s[j][e] = pij * (dp[j][e] - delta_row[h]);
      }
    }
    // dQ += dS·K: dS's A fragments from its accumulators, K (k = key, n = column) by ldmatrix.trans.
#pragma unroll
    for (int kk = 0; kk < kMmaKeys / 16; ++kk) {
      const uint32_t a[4] = {pack<T>(s[2 * kk][0], s[2 * kk][1]), pack<T>(s[2 * kk][2], s[2 * kk][3]),
                             pack<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]), pack<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int n = 0; n < D / 8; n += 2) {
        uint32_t b[4];
        ldmatrix_x4_trans(b, k_s + k_lane + 16 * kk * L::kRow + 8 * n);
        mma_16816<T>(dq[n], a, b[0], b[1]);
        mma_16816<T>(dq[n + 1], a, b[2], b[3]);
      }
    }
  });

  const SeqView dqv = p.view(dqs, bc.group, bc.head);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    if (row[h] >= p.L) continue;
    T* out_row = grad_q + dqv.offset(row[h]) + 2 * c;
#pragma unroll
    for (int n = 0; n < D / 8; ++n)
      *reinterpret_cast<uint32_t*>(out_row + 8 * n) = pack<T>(dq[n][2 * h] * p.scale, dq[n][2 * h + 1] * p.scale);
  }
#endif
}

template <class T, int D>
__global__ void __launch_bounds__(32 * kMmaWarps) mma_grad_kv_kernel(
    Problem p, const T* __restrict__ go, Strides gs, const T* __restrict__ q, Strides qs, const T* __restrict__ k,
    Strides ks, const T* __restrict__ v, Strides vs, const float* __restrict__ lse, Strides ls,
    const float* __restrict__ delta, Strides ds, T* __restrict__ grad_k, Strides dks, T* __restrict__ grad_v,
    Strides dvs) {
#if (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800) || defined(SKYLOOM_CUDA_EMULATION)
  using L = MmaBackwardTraits<T, D>;
  SKYLOOM_DYNAMIC_SHARED_MEMORY(smem);
  T* k_s = reinterpret_cast<T*>(smem);
  T* v_s = k_s + L::kKeyRows * L::kRow;
  T* q_s = v_s + L::kKeyRows * L::kRow;
  T* go_s = q_s + kBwdQueries * L::kRow;
  float* lse2_s = reinterpret_cast<float*>(go_s + kBwdQueries * L::kRow);
  float* delta_s = lse2_s + kBwdQueries;
  int64_t* limit_s = reinterpret_cast<int64_t*>(delta_s + kBwdQueries);

  const int64_t tiles = (p.L + L::kKeyRows - 1) / L::kKeyRows;
  const BlockCoords bc = block_coords(tiles, p.heads);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, c = lane % 4;
  const SeqView qv = p.view(qs, bc.group, bc.head), kv = p.view(ks, bc.group, bc.head),
                vv = p.view(vs, bc.group, bc.head), gv = p.view(gs, bc.group, bc.head),
                lv = p.view(ls, bc.group, bc.head), dv = p.view(ds, bc.group, bc.head);
  const int64_t first_key = bc.tile * L::kKeyRows;
  const int64_t key[2] = {first_key + warp * 16 + g, first_key + warp * 16 + g + 8};
  stage_tile<T, D>(k, kv, first_key, L::kKeyRows, p.L, k_s, L::kRow);
  stage_tile<T, D>(v, vv, first_key, L::kKeyRows, p.L, v_s, L::kRow);
  const T* k_w = k_s + warp * 16 * L::kRow;  // this warp's 16 key rows
  const T* v_w = v_s + warp * 16 * L::kRow;

  float dk[D / 8][4], dvr[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[n][e] = dvr[n][e] = 0.f;
  const float score_scale = p.scale * kLog2e;
  const int matrix = lane / 8;
  const int lane_row = (8 * (matrix & 1) + lane % 8) * L::kRow + 8 * (matrix >> 1);

  for (int64_t q0 = 0; q0 < p.L; q0 += kBwdQueries) {
    const int64_t last = min(q0 + kBwdQueries, p.L) - 1;
    if (p.key_limit(bc.group, last) <= first_key) continue;  // no query of the tile sees these keys
    __syncthreads();  // the previous tile is read (and, the first time, K and V are staged)
    stage_tile<T, D>(q, qv, q0, kBwdQueries, p.L, q_s, L::kRow);
    stage_tile<T, D>(go, gv, q0, kBwdQueries, p.L, go_s, L::kRow);
    if (tid < kBwdQueries) {
      const int64_t i = q0 + tid;
      const bool valid = i < p.L;
      lse2_s[tid] = valid ? lse[lv.offset(i)] * kLog2e : 0.f;
      delta_s[tid] = valid ? delta[dv.offset(i)] : 0.f;
      limit_s[tid] = valid ? p.key_limit(bc.group, i) : 0;
    }
    __syncthreads();

    // Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ: rows are this warp's keys, tile j = queries q0 + 8j ..
    float st[kBwdQueries / 8][4], dpt[kBwdQueries / 8][4];
#pragma unroll
    for (int j = 0; j < kBwdQueries / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) st[j][e] = dpt[j][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t ka[4], va[4];
      load_a(ka, k_w, L::kRow, kk, g, c);
      load_a(va, v_w, L::kRow, kk, g, c);
#pragma unroll
      for (int j = 0; j < kBwdQueries / 8; ++j) {
        const T* query_row = q_s + (8 * j + g) * L::kRow + 16 * kk + 2 * c;
        const T* grad_row = go_s + (8 * j + g) * L::kRow + 16 * kk + 2 * c;
        mma_16816<T>(st[j], ka, *reinterpret_cast<const uint32_t*>(query_row),
                     *reinterpret_cast<const uint32_t*>(query_row + 8));
        mma_16816<T>(dpt[j], va, *reinterpret_cast<const uint32_t*>(grad_row),
                     *reinterpret_cast<const uint32_t*>(grad_row + 8));
      }
    }
    // Pᵀ in st, dSᵀ in dpt: element e is key key[e >> 1], query q0 + 8j + 2c + (e & 1).
#pragma unroll
    for (int j = 0; j < kBwdQueries / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int qi = 8 * j + 2 * c + (e & 1);
        const float pij = key[e >> 1] < limit_s[qi] ? exp2f(st[j][e] * score_scale - lse2_s[qi]) : 0.f;
        st[j][e] = pij;
        dpt[j][e] = pij * (dpt[j][e] - delta_s[qi]);
      }
    // dV += Pᵀ·dO and dK += dSᵀ·Q: A fragments from the accumulators, dO and Q (k = query,
    // n = column) by ldmatrix.trans.
#pragma unroll
    for (int kk = 0; kk < kBwdQueries / 16; ++kk) {
      const uint32_t pa[4] = {pack<T>(st[2 * kk][0], st[2 * kk][1]), pack<T>(st[2 * kk][2], st[2 * kk][3]),
                              pack<T>(st[2 * kk + 1][0], st[2 * kk + 1][1]),
                              pack<T>(st[2 * kk + 1][2], st[2 * kk + 1][3])};
      const uint32_t sa[4] = {pack<T>(dpt[2 * kk][0], dpt[2 * kk][1]), pack<T>(dpt[2 * kk][2], dpt[2 * kk][3]),
                              pack<T>(dpt[2 * kk + 1][0], dpt[2 * kk + 1][1]),
                              pack<T>(dpt[2 * kk + 1][2], dpt[2 * kk + 1][3])};
#pragma unroll
      for (int n = 0; n < D / 8; n += 2) {
        uint32_t b[4];
        ldmatrix_x4_trans(b, go_s + lane_row + 16 * kk * L::kRow + 8 * n);
        mma_16816<T>(dvr[n], pa, b[0], b[1]);
        mma_16816<T>(dvr[n + 1], pa, b[2], b[3]);
        ldmatrix_x4_trans(b, q_s + lane_row + 16 * kk * L::kRow + 8 * n);
        mma_16816<T>(dk[n], sa, b[0], b[1]);
        mma_16816<T>(dk[n + 1], sa, b[2], b[3]);
      }
    }
  }

  const SeqView dkv = p.view(dks, bc.group, bc.head), dvv = p.view(dvs, bc.group, bc.head);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    if (key[h] >= p.L) continue;
    T* k_row = grad_k + dkv.offset(key[h]) + 2 * c;
    T* v_row = grad_v + dvv.offset(key[h]) + 2 * c;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      *reinterpret_cast<uint32_t*>(k_row + 8 * n) = pack<T>(dk[n][2 * h] * p.scale, dk[n][2 * h + 1] * p.scale);
      *reinterpret_cast<uint32_t*>(v_row + 8 * n) = pack<T>(dvr[n][2 * h], dvr[n][2 * h + 1]);
    }
  }
#endif
}

inline Problem make_problem(const AttentionShape& shape, const AttentionOptions& o) {
  Problem p{int(o.mode), o.causal, float(o.scale), o.valid_lengths, shape.B, shape.T, shape.S, shape.heads, 0, 0};
  switch (o.mode) {
    case cpu::AttentionMode::kFull: p.L = shape.T * shape.S, p.groups = shape.B; break;
    case cpu::AttentionMode::kSpatial: p.L = shape.S, p.groups = shape.B * shape.T; break;
    default: p.L = shape.T, p.groups = shape.B * shape.S; break;
  }
  return p;
}

// Blocks of a launch that gives each block rows_per_block rows of every (sequence, head).
inline unsigned row_blocks(const Problem& p, int64_t rows_per_block) {
  return grid_size((p.L + rows_per_block - 1) / rows_per_block * p.heads * p.groups);
}

}  // namespace skyloom::cuda::flash
