// Flash-style spacetime attention on the CPU (see attention.h for the contract).
//
// Work is split into tasks: forward, one per (sequence, head, block of kBlockQ queries);
// backward, one per (sequence, head), which walks key blocks outermost so dK/dV accumulate
// in a small tile and dQ in one per-task buffer: deterministic, no atomics. Temporal mode with
// single-tile sequences has its own tasks, one per spatial position (see "temporal mode" below).
// Inside a task every operand tile is packed once into a zero-padded accumulation-type
// buffer, so the inner loops are two small register-blocked GEMMs written with GCC vector
// extensions (64-byte vectors), a vectorised exp2, and no dtype or stride logic.
// The task functions are compiled three times (x86-64-v4 / v3 / baseline) and picked at load
// time, so one wheel runs on any x86-64 and uses AVX-512 where it exists.
#include "cpu/attention.h"

#include <cmath>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <stdexcept>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

// Vector values only cross always_inline calls, so the ABI note about 64-byte vectors is moot.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace skyloom::cpu {
namespace {

#define SKY_INLINE inline __attribute__((always_inline))
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define SKY_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SKY_CLONES
#endif

constexpr int64_t kBlockQ = 256;  // query rows per tile: K/V tiles are packed once per this many rows
constexpr int64_t kBlockK = 64;  // keys per tile at most: 4 vectors of float (double tiles hold 32)

template <class A> struct VecTraits;
template <> struct VecTraits<float> {
  typedef float vec __attribute__((vector_size(64)));
  typedef int32_t ivec __attribute__((vector_size(64)));
  static constexpr int kMantissa = 23, kBias = 127, kMinExp = -126, kMaxExp = 127, kTerms = 7;
};
template <> struct VecTraits<double> {
  typedef double vec __attribute__((vector_size(64)));
  typedef int64_t ivec __attribute__((vector_size(64)));
  static constexpr int kMantissa = 52, kBias = 1023, kMinExp = -1022, kMaxExp = 1023, kTerms = 14;
};
template <class A> using Vec = typename VecTraits<A>::vec;
template <class A> constexpr int64_t kLanes = 64 / sizeof(A);

template <class A> SKY_INLINE Vec<A> vload(const A* p) {
  Vec<A> v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}
template <class A> SKY_INLINE void vstore(A* p, Vec<A> v) { __builtin_memcpy(p, &v, sizeof(v)); }
template <class A> SKY_INLINE Vec<A> vsplat(A x) { return Vec<A>{} + x; }

// 2^x for x <= ~0: round to the nearest integer n, a Taylor polynomial for 2^f on
// f in [-1/2, 1/2] (error below one ulp of A), and n put straight into the exponent bits.
// Results below the smallest normal flush to zero (masked scores are -inf).
template <class A> SKY_INLINE Vec<A> vexp2(Vec<A> x) {
  using T = VecTraits<A>;
  using I = typename T::ivec;
  const auto underflow = x < vsplat<A>(A(T::kMinExp));
  x = x < vsplat<A>(A(T::kMinExp)) ? vsplat<A>(A(T::kMinExp)) : x;
  x = x > vsplat<A>(A(T::kMaxExp)) ? vsplat<A>(A(T::kMaxExp)) : x;
  const I n = __builtin_convertvector(x + (x < vsplat<A>(0) ? vsplat<A>(A(-0.5)) : vsplat<A>(A(0.5))), I);
  const Vec<A> f = x - __builtin_convertvector(n, Vec<A>);
  // coefficients ln2^k / k!, highest first
  constexpr double kLn2 = 0.693147180559945309417232121458176568;
  double c[T::kTerms];
  c[0] = 1.0;
  for (int i = 1; i < T::kTerms; ++i) c[i] = c[i - 1] * kLn2 / i;
  Vec<A> p = vsplat<A>(A(c[T::kTerms - 1]));
  for (int i = T::kTerms - 2; i >= 0; --i) p = p * f + vsplat<A>(A(c[i]));
  const I bits = (n + I{} + T::kBias) << T::kMantissa;
  Vec<A> scale;
  __builtin_memcpy(&scale, &bits, sizeof(scale));
  return underflow ? vsplat<A>(0) : p * scale;
}

template <class A> SKY_INLINE A hmax(Vec<A> v) {
  A m = v[0];
  for (int i = 1; i < kLanes<A>; ++i) m = v[i] > m ? v[i] : m;
  return m;
}
template <class A> SKY_INLINE A hsum(Vec<A> v) {
  A s = 0;
  for (int i = 0; i < kLanes<A>; ++i) s += v[i];
  return s;
}

// C[M x NV·lanes] = A[M x K] · Bt[K x NV·lanes] (Bt packed, row length NV·lanes); M % 4 == 0.
template <class A, int NV>
SKY_INLINE void gemm_abt(const A* a, int64_t lda, const A* bt, int64_t K, A* c, int64_t ldc, int64_t M) {
  constexpr int64_t W = kLanes<A>;
  for (int64_t r = 0; r < M; r += 4) {
    Vec<A> acc[4][NV];
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < NV; ++j) acc[i][j] = Vec<A>{};
    const A* a0 = a + r * lda;
    for (int64_t d = 0; d < K; ++d) {
      Vec<A> b[NV];
      for (int j = 0; j < NV; ++j) b[j] = vload(bt + d * NV * W + j * W);
      for (int i = 0; i < 4; ++i) {
        const Vec<A> ai = vsplat<A>(a0[i * lda + d]);
        for (int j = 0; j < NV; ++j) acc[i][j] += ai * b[j];
      }
    }
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < NV; ++j) vstore(c + (r + i) * ldc + j * W, acc[i][j]);
  }
}

// C[M x N] = diag(row_scale)·C + op(A) · B[K x N], op(A) = A[M x K] (row i at a + i·lda) or, with
// kTransA, A stored transposed (row k at a + k·lda); M % 8 == 0, N % (2·lanes) == 0.
// row_scale may be null (scale 1).
template <class A, bool kTransA>
SKY_INLINE void gemm_ab_acc(const A* a, int64_t lda, const A* b, int64_t ldb, int64_t K, A* c, int64_t ldc, int64_t M,
                            int64_t N, const A* row_scale) {
  constexpr int64_t W = kLanes<A>;
  for (int64_t r = 0; r < M; r += 8) {
    for (int64_t col = 0; col < N; col += 2 * W) {
      Vec<A> acc[8][2];
      for (int i = 0; i < 8; ++i) {
        const Vec<A> s = vsplat<A>(row_scale ? row_scale[r + i] : A(1));
        acc[i][0] = vload(c + (r + i) * ldc + col) * s;
        acc[i][1] = vload(c + (r + i) * ldc + col + W) * s;
      }
      for (int64_t k = 0; k < K; ++k) {
        const Vec<A> b0 = vload(b + k * ldb + col), b1 = vload(b + k * ldb + col + W);
        for (int i = 0; i < 8; ++i) {
          const Vec<A> ai = vsplat<A>(kTransA ? a[k * lda + r + i] : a[(r + i) * lda + k]);
          acc[i][0] += ai * b0;
          acc[i][1] += ai * b1;
        }
      }
      for (int i = 0; i < 8; ++i) {
        vstore(c + (r + i) * ldc + col, acc[i][0]);
        vstore(c + (r + i) * ldc + col + W, acc[i][1]);
      }
    }
  }
}

SKY_INLINE int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// How one sequence of one operand sits in memory: token i is at
// base + (i / inner_len)·outer_stride + (i % inner_len)·inner_stride.
struct SeqView {
  int64_t base, outer_stride, inner_stride, inner_len;
  SKY_INLINE int64_t offset(int64_t i) const { return base + (i / inner_len) * outer_stride + (i % inner_len) * inner_stride; }
};

struct Problem {
  AttentionShape shape;
  AttentionOptions options;
  int64_t L;        // tokens per sequence
  int64_t groups;   // sequences per head
  int64_t padded_d; // head_dim rounded up to 2 vectors of the accumulation type

  SeqView view(const int64_t stride[4], int64_t group, int64_t head) const {
    const int64_t T = shape.T, S = shape.S;
    switch (options.mode) {
      case AttentionMode::kFull:
        return {group * stride[0] + head * stride[3], stride[1], stride[2], S};
      case AttentionMode::kSpatial:
        return {(group / T) * stride[0] + (group % T) * stride[1] + head * stride[3], 0, stride[2], S};
      default:
        return {(group / S) * stride[0] + (group % S) * stride[2] + head * stride[3], 0, stride[1], T};
    }
  }
  int64_t batch_of(int64_t group) const {
    switch (options.mode) {
      case AttentionMode::kFull: return group;
      case AttentionMode::kSpatial: return group / shape.T;
      default: return group / shape.S;
    }
  }
  // Keys [0, limit) of the sequence are visible to query row i.
  int64_t key_limit(int64_t group, int64_t i) const {
    int64_t limit = L;
    const int64_t frame_len = options.mode == AttentionMode::kFull ? shape.S : 1;
    if (options.causal && options.mode != AttentionMode::kSpatial) limit = (i / frame_len + 1) * frame_len;
    if (options.valid_lengths && options.mode == AttentionMode::kFull) {
      int64_t frames = options.valid_lengths[batch_of(group)];
      frames = frames < 0 ? 0 : (frames > shape.T ? shape.T : frames);
      limit = limit < frames * shape.S ? limit : frames * shape.S;
    }
    return limit;
  }
};

template <class A> struct Workspace;  // layout of one thread's scratch buffer, in elements of A

// Pack rows [row0, row0+rows) of a sequence into dst[rows_padded x padded_d], times `mul`, zero-padded.
template <class T, class A>
SKY_INLINE void pack_rows(const T* src, const SeqView& view, int64_t row0, int64_t rows, int64_t rows_padded, int64_t D,
                          int64_t Dp, A mul, A* dst) {
  for (int64_t i = 0; i < rows; ++i) {
    const T* s = src + view.offset(row0 + i);
    A* d = dst + i * Dp;
    for (int64_t e = 0; e < D; ++e) d[e] = load_as<A>(s[e]) * mul;
    for (int64_t e = D; e < Dp; ++e) d[e] = 0;
  }
  std::memset(static_cast<void*>(dst + rows * Dp), 0, sizeof(A) * (rows_padded - rows) * Dp);
}

// Pack keys [k0, k0+nk) transposed: dst[padded_d x NK], zero beyond nk and D.
template <class T, class A>
SKY_INLINE void pack_transposed(const T* src, const SeqView& view, int64_t k0, int64_t nk, int64_t NK, int64_t D,
                                int64_t Dp, A* dst) {
  std::memset(static_cast<void*>(dst), 0, sizeof(A) * Dp * NK);
  for (int64_t j = 0; j < nk; ++j) {
    const T* s = src + view.offset(k0 + j);
    for (int64_t e = 0; e < D; ++e) dst[e * NK + j] = load_as<A>(s[e]);
  }
}

// One butterfly step of an in-register lanes x lanes transpose: swaps index bit B between row and column.
template <class A, int B> SKY_INLINE void transpose_step(Vec<A>* r) {
  constexpr int W = int(kLanes<A>);
  typename VecTraits<A>::ivec keep, swap;  // __builtin_shuffle indices: 0..W-1 from a, W..2W-1 from b
  for (int c = 0; c < W; ++c) {
    keep[c] = (c & B) ? W + (c ^ B) : c;
    swap[c] = (c & B) ? W + c : (c ^ B);
  }
  for (int i = 0; i < W; ++i)
    if (!(i & B)) {
      const Vec<A> a = r[i], b = r[i | B];
      r[i] = __builtin_shuffle(a, b, keep);
      r[i | B] = __builtin_shuffle(a, b, swap);
    }
}

// dst (Dp x ldd) = the transpose of rows [0, rows) of src (row j at src + j·lds, Dp wide), zero for
// rows <= j < ldd; ldd a multiple of the lane count. Lanes x lanes register blocks, no scalar scatter.
template <class A>
SKY_INLINE void transpose_rows(const A* src, int64_t lds, int64_t rows, int64_t Dp, A* dst, int64_t ldd) {
  constexpr int64_t W = kLanes<A>;
  for (int64_t j0 = 0; j0 < ldd; j0 += W)
    for (int64_t e0 = 0; e0 < Dp; e0 += W) {
      Vec<A> r[W];
      for (int64_t i = 0; i < W; ++i) r[i] = j0 + i < rows ? vload(src + (j0 + i) * lds + e0) : Vec<A>{};
      if constexpr (W == 16) transpose_step<A, 8>(r);
      transpose_step<A, 4>(r);
      transpose_step<A, 2>(r);
      transpose_step<A, 1>(r);
      for (int64_t i = 0; i < W; ++i) vstore(dst + (e0 + i) * ldd + j0, r[i]);
    }
}

template <class T, class A>
SKY_INLINE void store_rows(const A* src, int64_t Dp, int64_t rows, int64_t D, A mul, T* dst, const SeqView& view,
                           int64_t row0) {
  for (int64_t i = 0; i < rows; ++i) {
    T* d = dst + view.offset(row0 + i);
    for (int64_t e = 0; e < D; ++e) d[e] = StoreAs<T>::from(src[i * Dp + e] * mul);
  }
}

// Number of keys of a tile of nk visible to a row: 0..nk.
SKY_INLINE int64_t clamp_keys(int64_t visible, int64_t nk) { return visible < 0 ? 0 : (visible > nk ? nk : visible); }

SKY_INLINE int vectors_for(int64_t keys, int64_t lanes) {
  return keys <= lanes ? 1 : (keys <= 2 * lanes ? 2 : 4);
}

constexpr double kLog2e = 1.44269504088896340735992468100189214;
constexpr double kLn2 = 0.693147180559945309417232121458176568;

struct ForwardArgs {
  Problem p;
  Strided q, k, v;
  StridedOut out, lse;
};

template <class A> int64_t forward_workspace(const Problem& p) {
  const int64_t Dp = p.padded_d;
  // Q, K^T, V, scores, O tiles + m, l, alpha, limits
  return kBlockQ * Dp + Dp * kBlockK + kBlockK * Dp + kBlockQ * kBlockK + kBlockQ * Dp + 4 * kBlockQ;
}

// Scores of Mp query rows (row i at qs + i·ldq) against a packed K^T tile of nv vectors of keys.
template <class A>
SKY_INLINE void score_tile(int nv, const A* qs, int64_t ldq, const A* kt, int64_t Dp, A* sb, int64_t Mp) {
  if (nv == 1)
    gemm_abt<A, 1>(qs, ldq, kt, Dp, sb, kLanes<A>, Mp);
  else if (nv == 2)
    gemm_abt<A, 2>(qs, ldq, kt, Dp, sb, 2 * kLanes<A>, Mp);
  else
    gemm_abt<A, 4>(qs, ldq, kt, Dp, sb, 4 * kLanes<A>, Mp);
}

// One key tile of the online softmax. sb (Mp x NK scores, log2 units) becomes exp2(s - m_new), keys
// at or past a row's limit (and the tile's padding) masked to 0; m and l are updated, and alpha is
// exp2(m_old - m_new), the factor the output accumulated so far must be rescaled by.
template <class A>
SKY_INLINE void online_softmax_tile(A* sb, int nv, int64_t Mp, const A* limit, int64_t k0, int64_t nk, A* m, A* l,
                                    A* alpha) {
  constexpr int64_t W = kLanes<A>;
  const int64_t NK = nv * W;
  for (int64_t i = 0; i < Mp; ++i) {
    A* s = sb + i * NK;
    const int64_t valid = clamp_keys(int64_t(limit[i]) - k0, nk);  // padded keys are masked too
    for (int64_t j = valid; j < NK; ++j) s[j] = -std::numeric_limits<A>::infinity();
    Vec<A> mx = vload(s);
    for (int j = 1; j < nv; ++j) {
      const Vec<A> x = vload(s + j * W);
      mx = x > mx ? x : mx;
    }
    const A block_max = hmax<A>(mx);
    const A m_new = block_max > m[i] ? block_max : m[i];
    if (m_new == -std::numeric_limits<A>::infinity()) {  // nothing visible yet in this row
      for (int64_t j = 0; j < NK; ++j) s[j] = 0;
      alpha[i] = 1;
      continue;
    }
    alpha[i] = m_new == m[i] ? A(1) : std::exp2(m[i] - m_new);
    Vec<A> sum = Vec<A>{};
    for (int j = 0; j < nv; ++j) {
      const Vec<A> e = vexp2<A>(vload(s + j * W) - vsplat<A>(m_new));
      vstore(s + j * W, e);
      sum += e;
    }
    l[i] = l[i] * alpha[i] + hsum<A>(sum);
    m[i] = m_new;
  }
}

// The natural-log logsumexp of a finished row; +inf for a row with no visible key, so that the
// backward pass gives it zero probabilities.
template <class A> SKY_INLINE A row_lse(A m, A l) {
  return l > 0 ? A((m + std::log2(l)) * kLn2) : std::numeric_limits<A>::infinity();
}

template <class T, class A>
SKY_INLINE void forward_task(const ForwardArgs& a, int64_t task, A* ws) {
  const Problem& p = a.p;
  constexpr int64_t W = kLanes<A>;
  const int64_t D = p.shape.head_dim, Dp = p.padded_d, L = p.L;
  const int64_t q_blocks = (L + kBlockQ - 1) / kBlockQ;
  const int64_t qb = task % q_blocks, head = (task / q_blocks) % p.shape.heads, group = task / q_blocks / p.shape.heads;
  const int64_t q0 = qb * kBlockQ, rows = L - q0 < kBlockQ ? L - q0 : kBlockQ, Mp = round_up(rows, 8);

  A* qs = ws;
  A* kt = qs + kBlockQ * Dp;
  A* vb = kt + Dp * kBlockK;
  A* sb = vb + kBlockK * Dp;
  A* ob = sb + kBlockQ * kBlockK;
  A* m = ob + kBlockQ * Dp;
  A* l = m + kBlockQ;
  A* alpha = l + kBlockQ;
  A* limit = alpha + kBlockQ;

  const SeqView qv = p.view(a.q.stride, group, head), kv = p.view(a.k.stride, group, head),
                vv = p.view(a.v.stride, group, head);
  // Scores in log2 units: exp2(x·log2e) == exp(x), and exp2 is the cheap one.
  pack_rows(static_cast<const T*>(a.q.data), qv, q0, rows, Mp, D, Dp, A(p.options.scale * kLog2e), qs);
  int64_t key_end = 0;
  for (int64_t i = 0; i < Mp; ++i) {
    const int64_t lim = i < rows ? p.key_limit(group, q0 + i) : 0;
    limit[i] = A(lim);
    key_end = lim > key_end ? lim : key_end;
    m[i] = -std::numeric_limits<A>::infinity();
    l[i] = 0;
  }
  std::memset(static_cast<void*>(ob), 0, sizeof(A) * Mp * Dp);

  for (int64_t k0 = 0; k0 < key_end; k0 += 4 * W) {
    const int64_t nk = key_end - k0 < 4 * W ? key_end - k0 : 4 * W;
    const int nv = vectors_for(nk, W);
    const int64_t NK = nv * W;
    pack_transposed(static_cast<const T*>(a.k.data), kv, k0, nk, NK, D, Dp, kt);
    pack_rows(static_cast<const T*>(a.v.data), vv, k0, nk, nk, D, Dp, A(1), vb);
    score_tile<A>(nv, qs, Dp, kt, Dp, sb, Mp);
    online_softmax_tile<A>(sb, nv, Mp, limit, k0, nk, m, l, alpha);
    gemm_ab_acc<A, false>(sb, NK, vb, Dp, nk, ob, Dp, Mp, Dp, alpha);
  }

  T* out = static_cast<T*>(a.out.data);
  A* lse = static_cast<A*>(a.lse.data);
  const SeqView ov = p.view(a.out.stride, group, head), lv = p.view(a.lse.stride, group, head);
  for (int64_t i = 0; i < rows; ++i) {
    const A inv = l[i] > 0 ? A(1) / l[i] : A(0);
    T* o = out + ov.offset(q0 + i);
    for (int64_t e = 0; e < D; ++e) o[e] = StoreAs<T>::from(ob[i * Dp + e] * inv);
    lse[lv.offset(q0 + i)] = row_lse(m[i], l[i]);
  }
}

struct BackwardArgs {
  Problem p;
  Strided grad_out, q, k, v, out, lse;
  StridedOut grad_q, grad_k, grad_v;
};

// The operands of one (query tile, key tile) block of the backward pass, packed by the caller.
// Row-major tiles have a leading dimension; K^T and V^T are (Dp x NK). Q is pre-scaled by `scale`.
template <class A> struct BackwardTile {
  const A* q; int64_t ldq;
  const A* grad_out; int64_t ldgo;
  const A* kt; const A* vt;  // K^T, V^T
  const A* k; int64_t ldk;   // K rows
  int64_t Dp;
  A* grad_v; A* grad_k; int64_t ldkv;  // accumulated, one row per key
  A* grad_q; int64_t ldgq;             // accumulated, one row per query (unscaled)
};

// P = exp2(scores·log2e − lse2), dS = P∘(dO·V^T − delta), keys at or past a row's limit masked;
// then dV += P^T·dO, dK += dS^T·Q, dQ += dS·K. pb and dpb are (Mp x NK) scratch tiles.
template <class A>
SKY_INLINE void backward_tile(const BackwardTile<A>& t, int nv, int64_t k0, int64_t nk, int64_t rows, int64_t Mp,
                              const A* lse2, const A* delta, const A* limit, A* pb, A* dpb) {
  constexpr int64_t W = kLanes<A>;
  const int64_t NK = nv * W, nk_padded = round_up(nk, 8), Dp = t.Dp;
  score_tile<A>(nv, t.q, t.ldq, t.kt, Dp, pb, Mp);          // scores (natural units)
  score_tile<A>(nv, t.grad_out, t.ldgo, t.vt, Dp, dpb, Mp);  // dP = dO · V^T
  for (int64_t i = 0; i < Mp; ++i) {
    A* pr = pb + i * NK;
    A* dr = dpb + i * NK;
    const int64_t valid = i < rows ? clamp_keys(int64_t(limit[i]) - k0, nk) : 0;
    const Vec<A> l2 = vsplat<A>(i < rows ? lse2[i] : A(0));
    const Vec<A> dl = vsplat<A>(i < rows ? delta[i] : A(0));
    for (int j = 0; j < nv; ++j) {
      const Vec<A> pj = vexp2<A>(vload(pr + j * W) * vsplat<A>(A(kLog2e)) - l2);
      vstore(pr + j * W, pj);
      vstore(dr + j * W, pj * (vload(dr + j * W) - dl));  // dS = P ∘ (dP − delta)
    }
    for (int64_t j = valid; j < NK; ++j) pr[j] = dr[j] = 0;
  }
  gemm_ab_acc<A, true>(pb, NK, t.grad_out, t.ldgo, Mp, t.grad_v, t.ldkv, nk_padded, Dp, nullptr);  // dV += P^T · dO
  gemm_ab_acc<A, true>(dpb, NK, t.q, t.ldq, Mp, t.grad_k, t.ldkv, nk_padded, Dp, nullptr);         // dK += dS^T · Q
  gemm_ab_acc<A, false>(dpb, NK, t.k, t.ldk, nk, t.grad_q, t.ldgq, Mp, Dp, nullptr);               // dQ += dS · K
}

template <class A> int64_t backward_workspace(const Problem& p) {
  const int64_t Dp = p.padded_d, L = p.L;
  // per-row delta/lse/limit (3L), dQ accumulator, K^T, V^T, K, dK, dV, Q, dO, P, dP
  return 3 * (L + kBlockQ) + (L + kBlockQ) * Dp + 2 * Dp * kBlockK + 3 * kBlockK * Dp + 2 * kBlockQ * Dp +
         2 * kBlockQ * kBlockK;
}

template <class T, class A>
SKY_INLINE void backward_task(const BackwardArgs& a, int64_t task, A* ws) {
  const Problem& p = a.p;
  constexpr int64_t W = kLanes<A>;
  const int64_t D = p.shape.head_dim, Dp = p.padded_d, L = p.L;
  const int64_t head = task % p.shape.heads, group = task / p.shape.heads;
  const A scale = A(p.options.scale);

  A* delta = ws;
  A* lse2 = delta + L + kBlockQ;
  A* limit = lse2 + L + kBlockQ;
  A* dq = limit + L + kBlockQ;
  A* kt = dq + (L + kBlockQ) * Dp;
  A* vt = kt + Dp * kBlockK;
  A* kb = vt + Dp * kBlockK;
  A* dk = kb + kBlockK * Dp;
  A* dv = dk + kBlockK * Dp;
  A* qs = dv + kBlockK * Dp;
  A* dob = qs + kBlockQ * Dp;
  A* pb = dob + kBlockQ * Dp;
  A* dpb = pb + kBlockQ * kBlockK;

  const SeqView qv = p.view(a.q.stride, group, head), kv = p.view(a.k.stride, group, head),
                vv = p.view(a.v.stride, group, head), gov = p.view(a.grad_out.stride, group, head),
                ov = p.view(a.out.stride, group, head), lv = p.view(a.lse.stride, group, head);
  const T* q = static_cast<const T*>(a.q.data);
  const T* go = static_cast<const T*>(a.grad_out.data);
  const T* o = static_cast<const T*>(a.out.data);
  const A* lse = static_cast<const A*>(a.lse.data);
  int64_t key_end = 0;
  for (int64_t i = 0; i < L; ++i) {
    const T* gi = go + gov.offset(i);
    const T* oi = o + ov.offset(i);
    A acc = 0;
    for (int64_t e = 0; e < D; ++e) acc += load_as<A>(gi[e]) * load_as<A>(oi[e]);
    delta[i] = acc;
    lse2[i] = lse[lv.offset(i)] * A(kLog2e);
    const int64_t lim = p.key_limit(group, i);
    limit[i] = A(lim);
    key_end = lim > key_end ? lim : key_end;
  }
  std::memset(static_cast<void*>(dq), 0, sizeof(A) * (L + kBlockQ) * Dp);

  for (int64_t k0 = 0; k0 < key_end; k0 += 4 * W) {
    const int64_t nk = key_end - k0 < 4 * W ? key_end - k0 : 4 * W;
    const int nv = vectors_for(nk, W);
    const int64_t NK = nv * W, nk_padded = round_up(nk, 8);
    pack_transposed(static_cast<const T*>(a.k.data), kv, k0, nk, NK, D, Dp, kt);
    pack_transposed(static_cast<const T*>(a.v.data), vv, k0, nk, NK, D, Dp, vt);
    pack_rows(static_cast<const T*>(a.k.data), kv, k0, nk, nk, D, Dp, A(1), kb);
    std::memset(static_cast<void*>(dk), 0, sizeof(A) * nk_padded * Dp);
    std::memset(static_cast<void*>(dv), 0, sizeof(A) * nk_padded * Dp);

    for (int64_t q0 = 0; q0 < L; q0 += kBlockQ) {
      const int64_t rows = L - q0 < kBlockQ ? L - q0 : kBlockQ, Mp = round_up(rows, 8);
      int64_t block_limit = 0;
      for (int64_t i = 0; i < rows; ++i) block_limit = limit[q0 + i] > block_limit ? int64_t(limit[q0 + i]) : block_limit;
      if (block_limit <= k0) continue;  // every key of this tile is masked for these queries

      pack_rows(q, qv, q0, rows, Mp, D, Dp, scale, qs);
      pack_rows(go, gov, q0, rows, Mp, D, Dp, A(1), dob);
      const BackwardTile<A> tile{qs, Dp, dob, Dp, kt, vt, kb, Dp, Dp, dv, dk, Dp, dq + q0 * Dp, Dp};
      backward_tile<A>(tile, nv, k0, nk, rows, Mp, lse2 + q0, delta + q0, limit + q0, pb, dpb);
    }
    store_rows(dk, Dp, nk, D, A(1), static_cast<T*>(a.grad_k.data), p.view(a.grad_k.stride, group, head), k0);
    store_rows(dv, Dp, nk, D, A(1), static_cast<T*>(a.grad_v.data), p.view(a.grad_v.stride, group, head), k0);
  }
  // keys no query can see get zero gradients
  const int64_t zero_from = key_end;
  {
    std::memset(static_cast<void*>(dk), 0, sizeof(A) * Dp);
    const SeqView dkv = p.view(a.grad_k.stride, group, head), dvv = p.view(a.grad_v.stride, group, head);
    for (int64_t j = zero_from; j < L; ++j) {
      store_rows(dk, Dp, 1, D, A(1), static_cast<T*>(a.grad_k.data), dkv, j);
      store_rows(dk, Dp, 1, D, A(1), static_cast<T*>(a.grad_v.data), dvv, j);
    }
  }
  store_rows(dq, Dp, L, D, scale, static_cast<T*>(a.grad_q.data), p.view(a.grad_q.stride, group, head), 0);
}

// --- temporal mode, short sequences ------------------------------------------------------------
// With T <= 4 vectors of keys every sequence is a single tile, and the generic task's cost is in
// packing: each (position, head) reads T rows of head_dim scattered a frame apart. A temporal task
// instead takes one spatial position with all its heads, stages each operand frame by frame (in
// the usual layout a frame's heads are one contiguous run, which the prefetchers stream), runs the
// same tile math per head out of the staged buffers, and writes the results back frame by frame.

SKY_INLINE bool temporal_single_tile(const Problem& p, int64_t lanes) {
  return p.options.mode == AttentionMode::kTemporal && p.L <= 4 * lanes;
}

// dst[t][h][0, Dp) = src[b, t, s, h, :]·mul for t < T, zero-padded to Tp rows and Dp columns.
template <class T, class A>
SKY_INLINE void stage_position(const T* src, const int64_t stride[4], const AttentionShape& sh, int64_t b, int64_t s,
                               int64_t Tp, int64_t Dp, A mul, A* dst) {
  const int64_t D = sh.head_dim;
  for (int64_t t = 0; t < sh.T; ++t)
    for (int64_t h = 0; h < sh.heads; ++h) {
      const T* row = src + b * stride[0] + t * stride[1] + s * stride[2] + h * stride[3];
      A* d = dst + (t * sh.heads + h) * Dp;
      for (int64_t e = 0; e < D; ++e) d[e] = load_as<A>(row[e]) * mul;
      for (int64_t e = D; e < Dp; ++e) d[e] = 0;
    }
  std::memset(static_cast<void*>(dst + sh.T * sh.heads * Dp), 0, sizeof(A) * (Tp - sh.T) * sh.heads * Dp);
}

// dst[b, t, s, h, :] = src[t][h][0, D)·mul for t < T.
template <class T, class A>
SKY_INLINE void unstage_position(const A* src, const AttentionShape& sh, int64_t b, int64_t s, int64_t Dp, A mul,
                                 T* dst, const int64_t stride[4]) {
  for (int64_t t = 0; t < sh.T; ++t)
    for (int64_t h = 0; h < sh.heads; ++h) {
      T* row = dst + b * stride[0] + t * stride[1] + s * stride[2] + h * stride[3];
      const A* r = src + (t * sh.heads + h) * Dp;
      for (int64_t e = 0; e < sh.head_dim; ++e) row[e] = StoreAs<T>::from(r[e] * mul);
    }
}

// Asks for the next position's rows of one operand while this one computes: the tasks of one
// thread run in order (see run_attention), and the loads are what a temporal task waits on.
template <class T>
SKY_INLINE void prefetch_position(const T* src, const int64_t stride[4], const AttentionShape& sh, int64_t position) {
  if (position >= sh.B * sh.S) return;
  const int64_t b = position / sh.S, s = position % sh.S;
  for (int64_t t = 0; t < sh.T; ++t)
    for (int64_t h = 0; h < sh.heads; ++h) {
      const char* row = reinterpret_cast<const char*>(src + b * stride[0] + t * stride[1] + s * stride[2] + h * stride[3]);
      for (int64_t byte = 0; byte < sh.head_dim * int64_t(sizeof(T)); byte += 64) __builtin_prefetch(row + byte);
    }
}

template <class A> int64_t temporal_forward_workspace(const Problem& p) {
  const int64_t Tp = round_up(p.L, 8), NK = 4 * kLanes<A>, Dp = p.padded_d, staged = Tp * p.shape.heads * Dp;
  // staged Q, K, V, O + K^T, scores, m, l, alpha, limits
  return 4 * staged + Dp * NK + Tp * NK + 4 * Tp;
}

template <class T, class A>
SKY_INLINE void temporal_forward_task(const ForwardArgs& a, int64_t task, A* ws) {
  const Problem& p = a.p;
  const AttentionShape& sh = p.shape;
  const int64_t b = task / sh.S, s = task % sh.S, T_ = sh.T, H = sh.heads, Dp = p.padded_d, ld = H * Dp;
  const int64_t Tp = round_up(T_, 8);
  const int nv = vectors_for(T_, kLanes<A>);
  const int64_t NK = nv * kLanes<A>;
  A* q = ws;
  A* k = q + Tp * ld;
  A* v = k + Tp * ld;
  A* o = v + Tp * ld;
  A* kt = o + Tp * ld;
  A* sb = kt + Dp * 4 * kLanes<A>;
  A* m = sb + Tp * 4 * kLanes<A>;
  A* l = m + Tp;
  A* alpha = l + Tp;
  A* limit = alpha + Tp;

  // Scores in log2 units, as in forward_task.
  stage_position(static_cast<const T*>(a.q.data), a.q.stride, sh, b, s, Tp, Dp, A(p.options.scale * kLog2e), q);
  stage_position(static_cast<const T*>(a.k.data), a.k.stride, sh, b, s, Tp, Dp, A(1), k);
  stage_position(static_cast<const T*>(a.v.data), a.v.stride, sh, b, s, Tp, Dp, A(1), v);
  prefetch_position(static_cast<const T*>(a.q.data), a.q.stride, sh, task + 1);
  prefetch_position(static_cast<const T*>(a.k.data), a.k.stride, sh, task + 1);
  prefetch_position(static_cast<const T*>(a.v.data), a.v.stride, sh, task + 1);
  std::memset(static_cast<void*>(o), 0, sizeof(A) * Tp * ld);
  A* lse = static_cast<A*>(a.lse.data);
  for (int64_t i = 0; i < Tp; ++i) limit[i] = A(i < T_ ? p.key_limit(task, i) : 0);
  for (int64_t h = 0; h < H; ++h) {
    for (int64_t i = 0; i < Tp; ++i) {
      m[i] = -std::numeric_limits<A>::infinity();
      l[i] = 0;
    }
    transpose_rows(k + h * Dp, ld, T_, Dp, kt, NK);
    score_tile<A>(nv, q + h * Dp, ld, kt, Dp, sb, Tp);
    online_softmax_tile<A>(sb, nv, Tp, limit, 0, T_, m, l, alpha);
    gemm_ab_acc<A, false>(sb, NK, v + h * Dp, ld, T_, o + h * Dp, ld, Tp, Dp, alpha);
    for (int64_t i = 0; i < T_; ++i) {
      const Vec<A> inv = vsplat<A>(l[i] > 0 ? A(1) / l[i] : A(0));
      for (int64_t e = 0; e < Dp; e += kLanes<A>) vstore(o + i * ld + h * Dp + e, vload(o + i * ld + h * Dp + e) * inv);
      lse[b * a.lse.stride[0] + i * a.lse.stride[1] + s * a.lse.stride[2] + h * a.lse.stride[3]] = row_lse(m[i], l[i]);
    }
  }
  unstage_position(o, sh, b, s, Dp, A(1), static_cast<T*>(a.out.data), a.out.stride);
}

template <class A> int64_t temporal_backward_workspace(const Problem& p) {
  const int64_t Tp = round_up(p.L, 8), NK = 4 * kLanes<A>, Dp = p.padded_d, staged = Tp * p.shape.heads * Dp;
  // staged Q, K, V, dO, dQ, dK, dV + K^T, V^T, P, dP + per (head, frame) lse2, delta + limits
  return 7 * staged + 2 * Dp * NK + 2 * Tp * NK + 2 * p.shape.heads * Tp + Tp;
}

template <class T, class A>
SKY_INLINE void temporal_backward_task(const BackwardArgs& a, int64_t task, A* ws) {
  const Problem& p = a.p;
  const AttentionShape& sh = p.shape;
  const int64_t b = task / sh.S, s = task % sh.S, T_ = sh.T, H = sh.heads, D = sh.head_dim, Dp = p.padded_d,
                ld = H * Dp;
  const int64_t Tp = round_up(T_, 8);
  const int nv = vectors_for(T_, kLanes<A>);
  const int64_t NK = nv * kLanes<A>;
  const A scale = A(p.options.scale);
  A* q = ws;
  A* k = q + Tp * ld;
  A* v = k + Tp * ld;
  A* go = v + Tp * ld;
  A* gq = go + Tp * ld;
  A* gk = gq + Tp * ld;
  A* gv = gk + Tp * ld;
  A* kt = gv + Tp * ld;
  A* vt = kt + Dp * 4 * kLanes<A>;
  A* pb = vt + Dp * 4 * kLanes<A>;
  A* dpb = pb + Tp * 4 * kLanes<A>;
  A* lse2 = dpb + Tp * 4 * kLanes<A>;  // [h][t]
  A* delta = lse2 + H * Tp;            // [h][t]
  A* limit = delta + H * Tp;

  stage_position(static_cast<const T*>(a.q.data), a.q.stride, sh, b, s, Tp, Dp, scale, q);
  stage_position(static_cast<const T*>(a.k.data), a.k.stride, sh, b, s, Tp, Dp, A(1), k);
  stage_position(static_cast<const T*>(a.v.data), a.v.stride, sh, b, s, Tp, Dp, A(1), v);
  stage_position(static_cast<const T*>(a.grad_out.data), a.grad_out.stride, sh, b, s, Tp, Dp, A(1), go);
  for (const Strided* x : {&a.q, &a.k, &a.v, &a.grad_out, &a.out})
    prefetch_position(static_cast<const T*>(x->data), x->stride, sh, task + 1);
  std::memset(static_cast<void*>(gq), 0, sizeof(A) * 3 * Tp * ld);
  const T* o = static_cast<const T*>(a.out.data);
  const A* lse = static_cast<const A*>(a.lse.data);
  for (int64_t t = 0; t < T_; ++t)
    for (int64_t h = 0; h < H; ++h) {
      const T* oi = o + b * a.out.stride[0] + t * a.out.stride[1] + s * a.out.stride[2] + h * a.out.stride[3];
      const A* gi = go + (t * H + h) * Dp;
      A acc = 0;
      for (int64_t e = 0; e < D; ++e) acc += gi[e] * load_as<A>(oi[e]);
      delta[h * Tp + t] = acc;
      lse2[h * Tp + t] =
          lse[b * a.lse.stride[0] + t * a.lse.stride[1] + s * a.lse.stride[2] + h * a.lse.stride[3]] * A(kLog2e);
    }
  for (int64_t i = 0; i < T_; ++i) limit[i] = A(p.key_limit(task, i));
  for (int64_t h = 0; h < H; ++h) {
    transpose_rows(k + h * Dp, ld, T_, Dp, kt, NK);
    transpose_rows(v + h * Dp, ld, T_, Dp, vt, NK);
    const BackwardTile<A> tile{q + h * Dp, ld, go + h * Dp, ld, kt, vt, k + h * Dp, ld, Dp,
                               gv + h * Dp, gk + h * Dp, ld, gq + h * Dp, ld};
    backward_tile<A>(tile, nv, 0, T_, T_, Tp, lse2 + h * Tp, delta + h * Tp, limit, pb, dpb);
  }
  unstage_position(gq, sh, b, s, Dp, scale, static_cast<T*>(a.grad_q.data), a.grad_q.stride);
  unstage_position(gk, sh, b, s, Dp, A(1), static_cast<T*>(a.grad_k.data), a.grad_k.stride);
  unstage_position(gv, sh, b, s, Dp, A(1), static_cast<T*>(a.grad_v.data), a.grad_v.stride);
}

// One multiversioned entry per storage type; the templates above inline into each clone.
#define SKY_TASKS(T, A, NAME)                                                                                  \
  SKY_CLONES void forward_##NAME(const ForwardArgs& a, int64_t task, A* ws) { forward_task<T, A>(a, task, ws); }    \
  SKY_CLONES void backward_##NAME(const BackwardArgs& a, int64_t task, A* ws) { backward_task<T, A>(a, task, ws); } \
  SKY_CLONES void temporal_forward_##NAME(const ForwardArgs& a, int64_t task, A* ws) {                              \
    temporal_forward_task<T, A>(a, task, ws);                                                                       \
  }                                                                                                                 \
  SKY_CLONES void temporal_backward_##NAME(const BackwardArgs& a, int64_t task, A* ws) {                            \
    temporal_backward_task<T, A>(a, task, ws);                                                                      \
  }
SKY_TASKS(float, float, f32)
SKY_TASKS(double, double, f64)
SKY_TASKS(Half, float, f16)
SKY_TASKS(BFloat16, float, bf16)
#undef SKY_TASKS

// chunk: consecutive tasks a thread takes at a time.
template <class A, class Args>
void run_tasks(const Args& args, int64_t tasks, int64_t workspace, void (*task_fn)(const Args&, int64_t, A*),
               int64_t chunk = 1) {
#pragma omp parallel
  {
    std::vector<A> ws(size_t(workspace) + 64);
#pragma omp for schedule(dynamic, chunk)
    for (int64_t t = 0; t < tasks; ++t) task_fn(args, t, ws.data());
  }
}

Problem make_problem(DType dtype, const AttentionShape& shape, const AttentionOptions& options) {
  Problem p{shape, options, 0, 0, 0};
  switch (options.mode) {
    case AttentionMode::kFull: p.L = shape.T * shape.S, p.groups = shape.B; break;
    case AttentionMode::kSpatial: p.L = shape.S, p.groups = shape.B * shape.T; break;
    case AttentionMode::kTemporal: p.L = shape.T, p.groups = shape.B * shape.S; break;
    default: throw std::invalid_argument("attention: unknown mode");
  }
  const int64_t lanes = dtype == DType::kFloat64 ? 8 : 16;
  p.padded_d = round_up(shape.head_dim, 2 * lanes);
  return p;
}


// The generic tasks, or the temporal ones where every sequence is a single key tile.
template <class A, class Args>
void run_attention(const Problem& p, const Args& args, void (*generic)(const Args&, int64_t, A*),
                   void (*temporal)(const Args&, int64_t, A*), int64_t generic_tasks, int64_t generic_workspace,
                   int64_t temporal_workspace) {
  if (temporal_single_tile(p, kLanes<A>))  // runs of consecutive positions, for prefetch_position
    run_tasks<A>(args, p.groups, temporal_workspace, temporal, 16);
  else
    run_tasks<A>(args, generic_tasks, generic_workspace, generic);
}

}  // namespace

void attention_forward(DType dtype, const AttentionShape& shape, const AttentionOptions& options, Strided q,
                       Strided k, Strided v, StridedOut out, StridedOut lse) {
  const Problem p = make_problem(dtype, shape, options);
  if (p.L == 0 || p.groups == 0 || shape.heads == 0 || shape.head_dim == 0) return;
  const ForwardArgs args{p, q, k, v, out, lse};
  const int64_t tasks = p.groups * shape.heads * ((p.L + kBlockQ - 1) / kBlockQ);
#define SKY_RUN(A, NAME)                                                                                  \
  return run_attention<A>(p, args, forward_##NAME, temporal_forward_##NAME, tasks, forward_workspace<A>(p), \
                          temporal_forward_workspace<A>(p))
  switch (dtype) {
    case DType::kFloat32: SKY_RUN(float, f32);
    case DType::kFloat64: SKY_RUN(double, f64);
    case DType::kFloat16: SKY_RUN(float, f16);
    case DType::kBFloat16: SKY_RUN(float, bf16);
  }
#undef SKY_RUN
}

void attention_backward(DType dtype, const AttentionShape& shape, const AttentionOptions& options, Strided grad_out,
                        Strided q, Strided k, Strided v, Strided out, Strided lse, StridedOut grad_q,
                        StridedOut grad_k, StridedOut grad_v) {
  const Problem p = make_problem(dtype, shape, options);
  if (p.L == 0 || p.groups == 0 || shape.heads == 0 || shape.head_dim == 0) return;
  const BackwardArgs args{p, grad_out, q, k, v, out, lse, grad_q, grad_k, grad_v};
  const int64_t tasks = p.groups * shape.heads;
#define SKY_RUN(A, NAME)                                                                                     \
  return run_attention<A>(p, args, backward_##NAME, temporal_backward_##NAME, tasks, backward_workspace<A>(p), \
                          temporal_backward_workspace<A>(p))
  switch (dtype) {
    case DType::kFloat32: SKY_RUN(float, f32);
    case DType::kFloat64: SKY_RUN(double, f64);
    case DType::kFloat16: SKY_RUN(float, f16);
    case DType::kBFloat16: SKY_RUN(float, bf16);
  }
#undef SKY_RUN
}

}  // namespace skyloom::cpu
