// Temporal-mode attention kernels for short T, forward and backward, launched by
// temporal_attention.cu. Temporal sequences are short (T ≈ 21 frames of a 480p latent) and
// many (B·S·heads), so the op moves far more bytes than it multiplies: it is judged in GB/s.
// The general kernels, a 128-thread block per 21-row sequence, would leave most threads idle.
//
// A block holds kSlots rows: as many whole sequences as fit (kSlots / T of them), staged in
// shared memory with 16-byte loads. Sequence n is (batch, position, head), numbered head
// fastest, so one block's sequences of one frame lie side by side in memory. Each row is
// owned by head_dim / 16 adjacent threads, each with 16 of its values in registers, in
// 16-byte chunks interleaved so that the row's threads touch contiguous bytes together; dot
// products finish with shuffles. (16 values a thread keep the backward pass at 128 registers;
// a quarter of head_dim 128 took 247, one 256-thread block per SM.) The whole sequence fits,
// so the forward softmax takes two passes over saved scores instead of an online rescale,
// and the backward pass computes delta itself and writes dQ, dK and dV in one launch.
//
// The kernels use only CUDA-core arithmetic, shared memory, __syncthreads, __syncwarp and
// __shfl_xor_sync, so tests/cuda_emulation runs this file on the CPU too.
#pragma once

#include <cstdint>

#include "cuda/attention_common.cuh"
#include "cuda/temporal_attention.cuh"

namespace skyloom::cuda::temporal {

constexpr int kSlots = 64;
static_assert(kSlots >= kTemporalMaxFrames, "a block must hold at least one whole sequence");

// The part of a head_dim row one thread owns: chunk c of thread `part` starts at element
// (part + c·kRowThreads)·kVec.
template <class T, int D>
struct RowSlice {
  static constexpr int kElems = 16;
  static constexpr int kRowThreads = D / kElems;   // 2, 4 or 8: a power of two within a warp
  static constexpr int kThreads = kSlots * kRowThreads;
  static constexpr int kVec = 16 / sizeof(T);      // elements per 16-byte chunk
  static constexpr int kRowChunks = D / kVec;
  static constexpr int kChunks = kElems / kVec;
  static_assert(kRowThreads >= 2 && kRowThreads <= 32 && (kRowThreads & (kRowThreads - 1)) == 0, "head_dim");
  __device__ static int start(int part, int c) { return (part + c * kRowThreads) * kVec; }
};

template <class T, int D>
using Slice = float[RowSlice<T, D>::kElems];

// 16 bytes moved at once, then read or written element by element.
template <class T>
union Chunk {
  uint4 raw;
  T e[16 / sizeof(T)];
};

// fn(i, x) for each value x of this thread's slice of row, i its index in the slice.
template <class T, int D, class Fn>
__device__ __forceinline__ void for_slice(const T* row, int part, Fn fn) {
  using R = RowSlice<T, D>;
#pragma unroll
  for (int c = 0; c < R::kChunks; ++c) {
    Chunk<T> chunk;
    chunk.raw = *reinterpret_cast<const uint4*>(row + R::start(part, c));
#pragma unroll
    for (int i = 0; i < R::kVec; ++i) fn(c * R::kVec + i, to_float(chunk.e[i]));
  }
}

template <class T, int D>
__device__ __forceinline__ void load_slice(const T* row, int part, Slice<T, D>& f, float mul) {
  for_slice<T, D>(row, part, [&](int i, float x) { f[i] = x * mul; });
}

template <class T, int D>
__device__ __forceinline__ void store_slice(T* row, int part, const Slice<T, D>& f, float mul) {
  using R = RowSlice<T, D>;
#pragma unroll
  for (int c = 0; c < R::kChunks; ++c) {
    Chunk<T> chunk;
#pragma unroll
    for (int i = 0; i < R::kVec; ++i) chunk.e[i] = from_float<T>(f[c * R::kVec + i] * mul);
    *reinterpret_cast<uint4*>(row + R::start(part, c)) = chunk.raw;
  }
}

// This thread's share of f · row; row_sum finishes it across the row's threads.
template <class T, int D>
__device__ __forceinline__ float dot_slice(const Slice<T, D>& f, const T* row, int part) {
  float acc = 0.f;
  for_slice<T, D>(row, part, [&](int i, float x) { acc += f[i] * x; });
  return acc;
}

// acc += a · row, on this thread's share
template <class T, int D>
__device__ __forceinline__ void axpy_slice(Slice<T, D>& acc, float a, const T* row, int part) {
  for_slice<T, D>(row, part, [&](int i, float x) { acc[i] += a * x; });
}

struct TemporalProblem {
  int64_t T, S, heads, sequences;  // sequences = B·S·heads
  int per_block;                   // whole sequences per block: kSlots / T
  bool causal;
  float scale;
};

// Element offset of frame t of sequence n = (b·S + s)·heads + h.
__device__ __forceinline__ int64_t row_offset(const Strides& st, const TemporalProblem& p, int64_t n, int64_t t) {
  const int64_t h = n % p.heads, s = (n / p.heads) % p.S, b = n / p.heads / p.S;
  return b * st.s[0] + t * st.s[1] + s * st.s[2] + h * st.s[3];
}

// Copies the block's rows (row r = frame r % T of its sequence r / T) into shared memory.
template <class T, int D>
__device__ __forceinline__ void stage_rows(const T* __restrict__ src, const Strides& st, const TemporalProblem& p,
                                           int64_t first, int rows, T* dst) {
  constexpr int kRowChunks = RowSlice<T, D>::kRowChunks, kVec = RowSlice<T, D>::kVec;
  const int frames = int(p.T);
  for (int idx = threadIdx.x; idx < rows * kRowChunks; idx += RowSlice<T, D>::kThreads) {
    const int r = idx / kRowChunks, c = idx % kRowChunks;
    const T* from = src + row_offset(st, p, first + r / frames, r % frames) + c * kVec;
    *reinterpret_cast<uint4*>(dst + r * D + c * kVec) = *reinterpret_cast<const uint4*>(from);
  }
}

// Where this thread sits: its block's sequences and rows, its row slot, its part of the row,
// and the row's sequence.
struct RowCoords {
  int64_t first;       // the block's first sequence
  int rows;            // rows the block holds: whole sequences, at most kSlots
  int slot, part, frame;
  int first_row;       // the slot of frame 0 of this thread's sequence
  bool active;         // slot < rows
  int64_t sequence;
  unsigned mask;       // the lanes of this row
};

template <int kRowThreads>
__device__ __forceinline__ RowCoords row_coords(const TemporalProblem& p) {
  RowCoords rc;
  const int frames = int(p.T);
  rc.first = int64_t(blockIdx.x) * p.per_block;
  rc.rows = int(min(int64_t(p.per_block), p.sequences - rc.first)) * frames;
  rc.slot = threadIdx.x / kRowThreads;
  rc.part = threadIdx.x % kRowThreads;
  rc.frame = rc.slot % frames;
  rc.first_row = rc.slot - rc.frame;
  rc.active = rc.slot < rc.rows;
  rc.sequence = rc.first + rc.slot / frames;
  rc.mask = row_lanes<kRowThreads>();
  return rc;
}

template <class T, int D>
__global__ void __launch_bounds__(RowSlice<T, D>::kThreads) forward_kernel(TemporalProblem p, const T* __restrict__ q,
                                                                     Strides qs, const T* __restrict__ k, Strides ks,
                                                                     const T* __restrict__ v, Strides vs,
                                                                     T* __restrict__ out, Strides os,
                                                                     float* __restrict__ lse, Strides ls) {
  SKYLOOM_DYNAMIC_SHARED_MEMORY(smem);
  T* k_s = reinterpret_cast<T*>(smem);
  T* v_s = k_s + kSlots * D;
  float* score_s = reinterpret_cast<float*>(v_s + kSlots * D);  // [slot][key frame]
  constexpr int R = RowSlice<T, D>::kRowThreads;
  const RowCoords rc = row_coords<R>(p);
  const int frames = int(p.T);

  Slice<T, D> qf, o;
  if (rc.active) load_slice<T, D>(q + row_offset(qs, p, rc.sequence, rc.frame), rc.part, qf, p.scale * kLog2e);
  stage_rows<T, D>(k, ks, p, rc.first, rc.rows, k_s);
  stage_rows<T, D>(v, vs, p, rc.first, rc.rows, v_s);
  __syncthreads();
  if (!rc.active) return;  // no block-wide barrier follows

  // Pass 1: scores (log2 units) and their maximum. Every frame sees at least itself, so m is finite.
  const int limit = p.causal ? rc.frame + 1 : frames;
  float* scores = score_s + rc.slot * frames;
  float m = -INFINITY;
  for (int j = 0; j < limit; ++j) {
    const float s = row_sum<R>(dot_slice<T, D>(qf, k_s + (rc.first_row + j) * D, rc.part), rc.mask);
    m = fmaxf(m, s);
    if (rc.part == 0) scores[j] = s;
  }
  __syncwarp(rc.mask);
  // Pass 2: probabilities against the final maximum, so no accumulator is ever rescaled.
  float l = 0.f;
#pragma unroll
  for (int e = 0; e < RowSlice<T, D>::kElems; ++e) o[e] = 0.f;
  for (int j = 0; j < limit; ++j) {
    const float pj = exp2f(scores[j] - m);
    l += pj;
    axpy_slice<T, D>(o, pj, v_s + (rc.first_row + j) * D, rc.part);
  }
  store_slice<T, D>(out + row_offset(os, p, rc.sequence, rc.frame), rc.part, o, 1.f / l);
  if (rc.part == 0) lse[row_offset(ls, p, rc.sequence, rc.frame)] = (m + log2f(l)) * kLn2;
}

// One launch for dQ, dK and dV. With P = softmax(scale·QKᵀ) recomputed from the saved lse,
// dP = dO·Vᵀ and delta_i = dO_i·O_i: dS = P ∘ (dP − delta), dQ = scale·dS·K,
// dK = scale·dSᵀ·Q, dV = Pᵀ·dO.
template <class T, int D>
__global__ void __launch_bounds__(RowSlice<T, D>::kThreads) backward_kernel(
    TemporalProblem p, const T* __restrict__ go, Strides gs, const T* __restrict__ q, Strides qs,
    const T* __restrict__ k, Strides ks, const T* __restrict__ v, Strides vs, const T* __restrict__ out, Strides os,
    const float* __restrict__ lse, Strides ls, T* __restrict__ grad_q, Strides dqs, T* __restrict__ grad_k,
    Strides dks, T* __restrict__ grad_v, Strides dvs) {
  SKYLOOM_DYNAMIC_SHARED_MEMORY(smem);
  T* q_s = reinterpret_cast<T*>(smem);
  T* k_s = q_s + kSlots * D;
  T* v_s = k_s + kSlots * D;
  T* go_s = v_s + kSlots * D;
  float* lse2_s = reinterpret_cast<float*>(go_s + kSlots * D);  // lse in log2 units
  float* delta_s = lse2_s + kSlots;
  constexpr int R = RowSlice<T, D>::kRowThreads;
  const RowCoords rc = row_coords<R>(p);
  const int frames = int(p.T);

  Slice<T, D> a, b;
  if (rc.active) load_slice<T, D>(out + row_offset(os, p, rc.sequence, rc.frame), rc.part, a, 1.f);
  stage_rows<T, D>(q, qs, p, rc.first, rc.rows, q_s);
  stage_rows<T, D>(k, ks, p, rc.first, rc.rows, k_s);
  stage_rows<T, D>(v, vs, p, rc.first, rc.rows, v_s);
  stage_rows<T, D>(go, gs, p, rc.first, rc.rows, go_s);
  __syncthreads();
  if (rc.active) {
    const float delta = row_sum<R>(dot_slice<T, D>(a, go_s + rc.slot * D, rc.part), rc.mask);
    if (rc.part == 0) {
      delta_s[rc.slot] = delta;
      lse2_s[rc.slot] = lse[row_offset(ls, p, rc.sequence, rc.frame)] * kLog2e;
    }
  }
  __syncthreads();
  if (!rc.active) return;  // no block-wide barrier follows

  // dQ for query row `slot`: a = scale·q, b = dO.
  {
    load_slice<T, D>(q_s + rc.slot * D, rc.part, a, p.scale);
    load_slice<T, D>(go_s + rc.slot * D, rc.part, b, 1.f);
    const float lse2 = lse2_s[rc.slot], delta = delta_s[rc.slot];
    Slice<T, D> dq;
#pragma unroll
    for (int e = 0; e < RowSlice<T, D>::kElems; ++e) dq[e] = 0.f;
    const int limit = p.causal ? rc.frame + 1 : frames;
    for (int j = 0; j < limit; ++j) {
      const T* key = k_s + (rc.first_row + j) * D;
      const float s = row_sum<R>(dot_slice<T, D>(a, key, rc.part), rc.mask);
      const float dp = row_sum<R>(dot_slice<T, D>(b, v_s + (rc.first_row + j) * D, rc.part), rc.mask);
      const float ds = exp2f(s * kLog2e - lse2) * (dp - delta);
      axpy_slice<T, D>(dq, ds, key, rc.part);
    }
    store_slice<T, D>(grad_q + row_offset(dqs, p, rc.sequence, rc.frame), rc.part, dq, p.scale);
  }
  // dK and dV for key row `slot`, over the query rows that see it: a = k, b = v.
  {
    load_slice<T, D>(k_s + rc.slot * D, rc.part, a, 1.f);
    load_slice<T, D>(v_s + rc.slot * D, rc.part, b, 1.f);
    Slice<T, D> dk, dv;
#pragma unroll
    for (int e = 0; e < RowSlice<T, D>::kElems; ++e) dk[e] = dv[e] = 0.f;
    for (int i = p.causal ? rc.frame : 0; i < frames; ++i) {
      const int row = rc.first_row + i;
      const float s = row_sum<R>(dot_slice<T, D>(a, q_s + row * D, rc.part), rc.mask) * p.scale;
      const float dp = row_sum<R>(dot_slice<T, D>(b, go_s + row * D, rc.part), rc.mask);
      const float pij = exp2f(s * kLog2e - lse2_s[row]);
      axpy_slice<T, D>(dv, pij, go_s + row * D, rc.part);
      axpy_slice<T, D>(dk, pij * (dp - delta_s[row]), q_s + row * D, rc.part);
    }
    store_slice<T, D>(grad_k + row_offset(dks, p, rc.sequence, rc.frame), rc.part, dk, p.scale);
    store_slice<T, D>(grad_v + row_offset(dvs, p, rc.sequence, rc.frame), rc.part, dv, 1.f);
  }
}

// ---- launch geometry, shared with tests/cuda_emulation --------------------------------------

inline TemporalProblem make_problem(const AttentionShape& shape, const AttentionOptions& options) {
  return {shape.T, shape.S, shape.heads, shape.B * shape.S * shape.heads, int(kSlots / shape.T), options.causal,
          float(options.scale)};
}

inline unsigned block_count(const TemporalProblem& p) {
  return grid_size((p.sequences + p.per_block - 1) / p.per_block);
}

// Dynamic shared memory of a block: K and V rows (+ the scores) forward; Q, K, V and dO rows
// (+ lse and delta per row) backward.
inline size_t forward_smem(int64_t element_size, int64_t head_dim, int64_t frames) {
  return 2 * kSlots * head_dim * element_size + kSlots * frames * sizeof(float);
}
inline size_t backward_smem(int64_t element_size, int64_t head_dim) {
  return 4 * kSlots * head_dim * element_size + 2 * kSlots * sizeof(float);
}

}  // namespace skyloom::cuda::temporal
