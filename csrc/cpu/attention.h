// Spacetime attention on the CPU, forward and backward, flash-style: tiled online softmax,
// the logsumexp of each query row saved for the backward pass, probabilities recomputed
// there; the (T·S)² score matrix is never materialised. torch-free.
//
// Every tensor is (B, T, S, heads, head_dim) with any strides over the first four axes and
// unit stride over head_dim. The three modes are one kernel over "sequences" read in place:
//   full      one sequence of T·S tokens per (batch, head)
//   spatial   one sequence of S tokens per (batch, frame, head)
//   temporal  one sequence of T tokens per (batch, spatial position, head)
// Masks are per-query prefixes of the sequence: causal keeps keys in frames <= the query's
// frame, valid_lengths[b] keeps keys in frames < valid_lengths[b].
#pragma once

#include <cstdint>

#include "cpu/dtypes.h"

namespace skyloom::cpu {

enum class AttentionMode { kFull = 0, kSpatial = 1, kTemporal = 2 };

struct AttentionShape {
  int64_t B, T, S, heads, head_dim;
};

struct AttentionOptions {
  AttentionMode mode = AttentionMode::kFull;
  bool causal = false;
  double scale = 1.0;
  const int64_t* valid_lengths = nullptr;  // (B,) frames per video, or null: all valid (full mode only)
};

// A (B, T, S, heads, head_dim) operand: data pointer and element strides of the first four axes.
struct Strided {
  const void* data;
  int64_t stride[4];
};
struct StridedOut {
  void* data;
  int64_t stride[4];
};

// out (B, T, S, heads, head_dim) and lse (B, T, S, heads), the natural-log logsumexp of each
// query row's scaled scores, both written through their strides. lse is float64 when dtype
// is kFloat64 and float32 otherwise (the accumulation type).
void attention_forward(DType dtype, const AttentionShape& shape, const AttentionOptions& options, Strided q,
                       Strided k, Strided v, StridedOut out, StridedOut lse);

// grad_q, grad_k, grad_v written through their strides; out and lse as attention_forward wrote them.
void attention_backward(DType dtype, const AttentionShape& shape, const AttentionOptions& options, Strided grad_out,
                        Strided q, Strided k, Strided v, Strided out, Strided lse, StridedOut grad_q,
                        StridedOut grad_k, StridedOut grad_v);

}  // namespace skyloom::cpu
