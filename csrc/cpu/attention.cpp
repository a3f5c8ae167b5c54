// Flash-style spacetime attention on the CPU (see attention.h for the contract).
//
// Work is split into tasks: forward, one per (sequence, head, block of kBlockQ queries);
// backward, one per (sequence, head), which walks key blocks outermost so dK/dV accumulate
// in a small tile and dQ in one per-task buffer: deterministic, no atomics. Temporal mode with
// single-tile sequences has its own tasks, one per spatial position. The tasks themselves are in
// attention_kernels.inc, compiled here once per instruction set (AVX-512, AVX2+FMA, and the
// baseline of the target: SSE2 on x86-64, NEON on arm64) with vectors of that set's native width,
// and picked on every call by what the CPU supports (SKYLOOM_CPU_CAPABILITY overrides it), so one
// wheel runs on any x86-64 and uses the widest vectors it has; short temporal sequences take the
// AVX2 copy on an AVX-512 CPU (isa_for).
#include "cpu/attention.h"
#include "cpu/capability.h"
#include "cpu/streaming.h"

#include <array>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

// Vector values only cross always_inline calls, so the ABI note about wide vectors is moot.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace skyloom::cpu {
namespace {

#define SKY_INLINE inline __attribute__((always_inline))

constexpr int64_t kBlockQ = 256;  // query rows per tile: K/V tiles are packed once per this many rows
constexpr int64_t kBlockK = 64;   // keys per tile at most: 4 AVX-512 vectors, 8 AVX2, 16 SSE2 (of floats)

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
  bool stream_out;  // the temporal kernels write each output with streaming stores (streaming.h)

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

// Number of keys of a tile of nk visible to a row: 0..nk.
SKY_INLINE int64_t clamp_keys(int64_t visible, int64_t nk) { return visible < 0 ? 0 : (visible > nk ? nk : visible); }

SKY_INLINE int vectors_for(int64_t keys, int64_t lanes) {
  return keys <= lanes ? 1 : (keys <= 2 * lanes ? 2 : int(round_up(keys, 4 * lanes) / lanes));
}

constexpr double kLog2e = 1.44269504088896340735992468100189214;
constexpr double kLn2 = 0.693147180559945309417232121458176568;

struct ForwardArgs {
  Problem p;
  Strided q, k, v;
  StridedOut out, lse;
};

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
  bool accumulate;                     // false: the gradient tiles are overwritten, not added to
};

Problem make_problem(DType dtype, const AttentionShape& shape, const AttentionOptions& options, int vector_bytes) {
  Problem p{shape, options, 0, 0, 0, false};
  switch (options.mode) {
    case AttentionMode::kFull: p.L = shape.T * shape.S, p.groups = shape.B; break;
    case AttentionMode::kSpatial: p.L = shape.S, p.groups = shape.B * shape.T; break;
    case AttentionMode::kTemporal: p.L = shape.T, p.groups = shape.B * shape.S; break;
    default: throw std::invalid_argument("attention: unknown mode");
  }
  const int64_t lanes = vector_bytes / (dtype == DType::kFloat64 ? 8 : 4);
  p.padded_d = round_up(shape.head_dim, 2 * lanes);
  // On the large temporal forward (32 MiB output) streaming took 0.8-0.9 ms off 11.5-13.9
  // (docs/performance.md, 2026-12-07).
  p.stream_out = stream_output(shape.B * shape.T * shape.S * shape.heads * shape.head_dim * element_size(dtype));
  return p;
}

// One task: args is the ForwardArgs or BackwardArgs, workspace this thread's scratch buffer.
using TaskFn = void (*)(const void* args, int64_t task, void* workspace);

// chunk: consecutive tasks a thread takes at a time. Outside the per-instruction-set code, so the
// std::vector here is compiled for the baseline.
void run_tasks(TaskFn task_fn, const void* args, int64_t tasks, int64_t workspace_bytes, int64_t chunk) {
#pragma omp parallel
  {
    std::vector<double> ws(size_t(workspace_bytes) / sizeof(double) + 64);
#pragma omp for schedule(dynamic, chunk)
    for (int64_t t = 0; t < tasks; ++t) task_fn(args, t, ws.data());
  }
}

}  // namespace
}  // namespace skyloom::cpu

// The kernels, once per instruction set. Each copy lives in its own namespace, so no function
// compiled for a wider instruction set can be linked in where the baseline one is expected.
#if SKY_X86_KERNELS
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
namespace skyloom::cpu::avx512 {
namespace {
constexpr int kVectorBytes = 64, kVectorRegisters = 32;
#include "cpu/attention_kernels.inc"
}  // namespace
}  // namespace skyloom::cpu::avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("arch=x86-64-v3")
namespace skyloom::cpu::avx2 {
namespace {
constexpr int kVectorBytes = 32, kVectorRegisters = 16;
#include "cpu/attention_kernels.inc"
}  // namespace
}  // namespace skyloom::cpu::avx2
#pragma GCC pop_options
#endif

namespace skyloom::cpu::baseline {
namespace {
constexpr int kVectorBytes = 16, kVectorRegisters = 16;
#include "cpu/attention_kernels.inc"
}  // namespace
}  // namespace skyloom::cpu::baseline

namespace skyloom::cpu {

namespace {
// The instruction set for one call. Temporal sequences whose keys fill one AVX2 vector (T <= 8
// in fp32 accumulation, which fp16/bf16 use too; 4 in fp64) leave half of every AVX-512 vector
// empty, and the AVX2 copy ran them 1.2-1.6x as fast on an AVX-512 Xeon (docs/performance.md,
// 2026-12-04). A copy pinned by SKYLOOM_CPU_CAPABILITY is always the one that runs.
std::string isa_for(DType dtype, const AttentionShape& shape, const AttentionOptions& options) {
  const std::string isa = cpu_capability();
  const int64_t avx2_lanes = 32 / (dtype == DType::kFloat64 ? 8 : 4);
  if (isa == "avx512" && !cpu_capability_pinned() && options.mode == AttentionMode::kTemporal && shape.T <= avx2_lanes) return "avx2";
  return isa;
}
}  // namespace

void attention_forward(DType dtype, const AttentionShape& shape, const AttentionOptions& options, Strided q,
                       Strided k, Strided v, StridedOut out, StridedOut lse) {
  const std::string isa = isa_for(dtype, shape, options);
#if SKY_X86_KERNELS
  if (isa == "avx512") return avx512::forward(dtype, shape, options, q, k, v, out, lse);
  if (isa == "avx2") return avx2::forward(dtype, shape, options, q, k, v, out, lse);
#endif
  baseline::forward(dtype, shape, options, q, k, v, out, lse);
}

void attention_backward(DType dtype, const AttentionShape& shape, const AttentionOptions& options, Strided grad_out,
                        Strided q, Strided k, Strided v, Strided out, Strided lse, StridedOut grad_q,
                        StridedOut grad_k, StridedOut grad_v) {
  const std::string isa = isa_for(dtype, shape, options);
#if SKY_X86_KERNELS
  if (isa == "avx512")
    return avx512::backward(dtype, shape, options, grad_out, q, k, v, out, lse, grad_q, grad_k, grad_v);
  if (isa == "avx2")
    return avx2::backward(dtype, shape, options, grad_out, q, k, v, out, lse, grad_q, grad_k, grad_v);
#endif
  baseline::backward(dtype, shape, options, grad_out, q, k, v, out, lse, grad_q, grad_k, grad_v);
}

}  // namespace skyloom::cpu
