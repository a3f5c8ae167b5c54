// Runs the CUDA attention kernels (csrc/cuda/*_kernels.cuh) on the CPU through emulate.h and
// compares out, lse, dQ, dK and dV with attention computed in double from the same rounded
// inputs.
//
//   attention KERNELS DTYPE B T S HEADS D MODE CAUSAL VALID LAYOUT
//     KERNELS  general (CUDA-core forward and backward), mma (tensor-core forward and
//              backward), wmma (tensor-core forward, general backward) or temporal (short T)
//     DTYPE f32|f16|bf16   MODE full|spatial|temporal   CAUSAL 0|1
//     VALID    - or per-video frame counts, comma-separated (full mode)
//     LAYOUT   contiguous|permuted|padded
//
// Prints each output's largest error over its reference's largest magnitude (at least 1) and
// exits 1 when one exceeds the dtype's tolerance, 2 on bad arguments.
#include "emulate.h"

#include <cstdio>
#include <cstdlib>
#include <random>
#include <sstream>
#include <string>

#include "cuda/attention_kernels.cuh"
#include "cuda/temporal_attention_kernels.cuh"

namespace {

using namespace skyloom;
using namespace skyloom::cuda;

[[noreturn]] void usage(const std::string& problem) {
  std::fprintf(stderr, "%s\nusage: attention general|mma|wmma|temporal f32|f16|bf16 B T S HEADS D "
                       "full|spatial|temporal CAUSAL(0|1) VALID(-|n,n,...) contiguous|permuted|padded\n",
               problem.c_str());
  std::exit(2);
}

struct Layout {
  int64_t size;  // elements of storage
  int64_t stride[4];
};

// (B, T, S, heads) strides of the storage orders the test uses; head_dim is unit-stride.
Layout make_layout(const std::string& name, int64_t B, int64_t T, int64_t S, int64_t H, int64_t D) {
  if (name == "contiguous") return {B * T * S * H * D, {T * S * H * D, S * H * D, H * D, D}};
  if (name == "permuted") return {B * S * H * T * D, {S * H * T * D, D, H * T * D, T * D}};  // stored (B, S, H, T, D)
  if (name == "padded") {
    const int64_t row = D + 8;  // gaps between rows; starts stay 16-byte aligned
    return {B * T * S * H * row, {T * S * H * row, S * H * row, H * row, row}};
  }
  usage("unknown layout " + name);
}

struct Case {
  std::string kernels, mode;
  int64_t B, T, S, H, D;
  bool causal;
  std::vector<int64_t> valid;  // empty: every frame valid
  double scale;
  int64_t at(const int64_t* st, int64_t b, int64_t t, int64_t s, int64_t h) const {
    return b * st[0] + t * st[1] + s * st[2] + h * st[3];
  }
};

// The largest error over the largest reference magnitude (at least 1); NaN anywhere is infinite.
double worst(const std::vector<double>& error, const std::vector<double>& reference) {
  double e = 0, r = 1;
  for (size_t i = 0; i < error.size(); ++i) {
    if (std::isnan(error[i])) return INFINITY;
    e = std::max(e, error[i]), r = std::max(r, std::abs(reference[i]));
  }
  return e / r;
}

// Token (frame, position) pairs of every sequence of the mode, and which keys a query sees:
// what the modes mean (docs/kernels.md), written out independently of the kernels' views.
struct Token {
  int64_t t, s;
};
std::vector<std::vector<Token>> sequences_of(const Case& c, int64_t& heads_loop) {
  std::vector<std::vector<Token>> seqs;
  if (c.mode == "full") {
    std::vector<Token> all;
    for (int64_t t = 0; t < c.T; ++t)
      for (int64_t s = 0; s < c.S; ++s) all.push_back({t, s});
    seqs.push_back(all);
  } else if (c.mode == "spatial") {
    for (int64_t t = 0; t < c.T; ++t) {
      std::vector<Token> frame;
      for (int64_t s = 0; s < c.S; ++s) frame.push_back({t, s});
      seqs.push_back(frame);
    }
  } else {
    for (int64_t s = 0; s < c.S; ++s) {
      std::vector<Token> column;
      for (int64_t t = 0; t < c.T; ++t) column.push_back({t, s});
      seqs.push_back(column);
    }
  }
  heads_loop = c.H;
  return seqs;
}

bool visible(const Case& c, int64_t b, const Token& query, const Token& key) {
  if (c.causal && key.t > query.t) return false;
  if (!c.valid.empty() && c.mode == "full" && key.t >= c.valid[b]) return false;
  return true;
}

template <class T, int D>
int run(const Case& c, const std::string& layout_name, double tolerance) {
  const Layout in = make_layout(layout_name, c.B, c.T, c.S, c.H, D);
  const Layout out_l = make_layout("contiguous", c.B, c.T, c.S, c.H, D);
  const int64_t lse_st[4] = {c.T * c.S * c.H, c.S * c.H, c.H, 1};
  std::mt19937 gen(1234);
  std::normal_distribution<float> normal;
  auto make = [&] {
    std::vector<T> x(in.size + 8);  // +8: the padded layout's last row ends past size
    for (auto& e : x) e = from_float<T>(normal(gen));
    return x;
  };
  std::vector<T> q = make(), k = make(), v = make(), go = make();
  std::vector<T> out(out_l.size), dq(out_l.size), dk(out_l.size), dv(out_l.size);
  std::vector<float> lse(c.B * c.T * c.S * c.H), delta(lse.size());

  const AttentionShape shape{c.B, c.T, c.S, c.H, D};
  AttentionOptions options;
  options.mode = c.mode == "full" ? cpu::AttentionMode::kFull
                 : c.mode == "spatial" ? cpu::AttentionMode::kSpatial : cpu::AttentionMode::kTemporal;
  options.causal = c.causal;
  options.scale = c.scale;
  options.valid_lengths = c.valid.empty() ? nullptr : c.valid.data();
  const Strides is = strides_of(in.stride), os = strides_of(out_l.stride), ls = strides_of(lse_st);

  if (c.kernels == "temporal") {
    const temporal::TemporalProblem p = temporal::make_problem(shape, options);
    using R = temporal::RowSlice<T, D>;
    if (temporal::backward_smem(sizeof(T), D) > sizeof(emu::dynamic_shared_memory)) std::abort();
    emu::launch(temporal::block_count(p), R::kThreads, [&] {
      temporal::forward_kernel<T, D>(p, q.data(), is, k.data(), is, v.data(), is, out.data(), os, lse.data(), ls);
    });
    emu::launch(temporal::block_count(p), R::kThreads, [&] {
      temporal::backward_kernel<T, D>(p, go.data(), is, q.data(), is, k.data(), is, v.data(), is, out.data(), os,
                                      lse.data(), ls, dq.data(), os, dk.data(), os, dv.data(), os);
    });
  } else {
    using namespace flash;
    const Problem p = make_problem(shape, options);
    if (c.kernels == "wmma" || c.kernels == "mma") {
      if constexpr (!std::is_same_v<T, float> && D >= 64) {
        if (WmmaSmem<T, D>::bytes > sizeof(emu::dynamic_shared_memory)) std::abort();
        if (c.kernels == "wmma")
          emu::launch(row_blocks(p, kWmmaRows), 32 * kWmmaWarps, [&] {
            wmma_forward_kernel<T, D>(p, q.data(), is, k.data(), is, v.data(), is, out.data(), os, lse.data(), ls);
          });
        else
          emu::launch(row_blocks(p, MmaTraits<T, D>::kRows), 32 * kMmaWarps, [&] {
            mma_forward_kernel<T, D>(p, q.data(), is, k.data(), is, v.data(), is, out.data(), os, lse.data(), ls);
          });
      } else {
        usage("the tensor-core kernels take f16/bf16 with head_dim 64 or 128");
      }
    } else {
      emu::launch(row_blocks(p, Core<D>::kRows), Core<D>::kThreads, [&] {
        forward_kernel<T, D>(p, q.data(), is, k.data(), is, v.data(), is, out.data(), os, lse.data(), ls);
      });
    }
    const int64_t rows = p.L * p.heads * p.groups;
    emu::launch(unsigned((rows + 255) / 256), 256, [&] {
      delta_kernel<T, D>(p, go.data(), is, out.data(), os, delta.data(), ls, rows);
    });
    bool tensor_core_backward = false;
    if constexpr (!std::is_same_v<T, float> && D >= 64) {
      if (c.kernels == "mma") {
        using BL = MmaBackwardTraits<T, D>;
        if (BL::grad_kv_smem > sizeof(emu::dynamic_shared_memory)) std::abort();
        emu::launch(row_blocks(p, BL::kQueryRows), 32 * kMmaWarps, [&] {
          mma_grad_q_kernel<T, D>(p, go.data(), is, q.data(), is, k.data(), is, v.data(), is, lse.data(), ls,
                                  delta.data(), ls, dq.data(), os);
        });
        emu::launch(row_blocks(p, BL::kKeyRows), 32 * kMmaWarps, [&] {
          mma_grad_kv_kernel<T, D>(p, go.data(), is, q.data(), is, k.data(), is, v.data(), is, lse.data(), ls,
                                   delta.data(), ls, dk.data(), os, dv.data(), os);
        });
        tensor_core_backward = true;
      }
    }
    if (!tensor_core_backward) {
      emu::launch(row_blocks(p, Core<D>::kRows), Core<D>::kThreads, [&] {
        grad_q_kernel<T, D>(p, go.data(), is, q.data(), is, k.data(), is, v.data(), is, lse.data(), ls,
                            delta.data(), ls, dq.data(), os);
      });
      emu::launch(row_blocks(p, Core<D>::kKeyRows), Core<D>::kKeyThreads, [&] {
        grad_kv_kernel<T, D>(p, go.data(), is, q.data(), is, k.data(), is, v.data(), is, lse.data(), ls,
                             delta.data(), ls, dk.data(), os, dv.data(), os);
      });
    }
  }

  std::vector<double> ref[5], err[5];  // out, lse, dq, dk, dv
  int64_t heads = 0;
  const auto seqs = sequences_of(c, heads);
  for (int64_t b = 0; b < c.B; ++b)
    for (const auto& seq : seqs)
      for (int64_t h = 0; h < heads; ++h) {
        const int64_t L = int64_t(seq.size());
        auto x = [&](const std::vector<T>& t, int64_t i, int d) {
          return double(to_float(t[c.at(in.stride, b, seq[i].t, seq[i].s, h) + d]));
        };
        auto y = [&](const std::vector<T>& t, int64_t i, int d) {
          return double(to_float(t[c.at(out_l.stride, b, seq[i].t, seq[i].s, h) + d]));
        };
        std::vector<double> P(L * L, 0.0), dS(L * L, 0.0);
        for (int64_t i = 0; i < L; ++i) {
          double m = -INFINITY;
          for (int64_t j = 0; j < L; ++j) {
            if (!visible(c, b, seq[i], seq[j])) continue;
            double acc = 0;
            for (int d = 0; d < D; ++d) acc += x(q, i, d) * x(k, j, d);
            P[i * L + j] = acc * c.scale;
            m = std::max(m, P[i * L + j]);
          }
          double l = 0;
          for (int64_t j = 0; j < L; ++j)
            if (visible(c, b, seq[i], seq[j])) l += std::exp(P[i * L + j] - m);
          for (int64_t j = 0; j < L; ++j)
            P[i * L + j] = visible(c, b, seq[i], seq[j]) ? std::exp(P[i * L + j] - m) / l : 0;
          ref[1].push_back(m + std::log(l));
          err[1].push_back(std::abs(lse[c.at(lse_st, b, seq[i].t, seq[i].s, h)] - ref[1].back()));
          double delta_i = 0;
          std::vector<double> dP(L, 0.0);
          for (int64_t j = 0; j < L; ++j) {
            if (P[i * L + j] == 0) continue;
            for (int d = 0; d < D; ++d) dP[j] += x(go, i, d) * x(v, j, d);
            delta_i += P[i * L + j] * dP[j];
          }
          for (int64_t j = 0; j < L; ++j) dS[i * L + j] = P[i * L + j] * (dP[j] - delta_i);
          for (int d = 0; d < D; ++d) {
            double o = 0;
            for (int64_t j = 0; j < L; ++j) o += P[i * L + j] * x(v, j, d);
            ref[0].push_back(o);
            err[0].push_back(std::abs(y(out, i, d) - o));
          }
        }
        for (int64_t r = 0; r < L; ++r)
          for (int d = 0; d < D; ++d) {
            double gq = 0, gk = 0, gv = 0;
            for (int64_t j = 0; j < L; ++j) gq += dS[r * L + j] * x(k, j, d);
            for (int64_t i = 0; i < L; ++i) gk += dS[i * L + r] * x(q, i, d), gv += P[i * L + r] * x(go, i, d);
            const double want[3] = {gq * c.scale, gk * c.scale, gv};
            const std::vector<T>* got[3] = {&dq, &dk, &dv};
            for (int g = 0; g < 3; ++g) {
              ref[2 + g].push_back(want[g]);
              err[2 + g].push_back(std::abs(y(*got[g], r, d) - want[g]));
            }
          }
      }
  const char* names[5] = {"out", "lse", "dq", "dk", "dv"};
  int status = 0;
  for (int i = 0; i < 5; ++i) {
    const double e = worst(err[i], ref[i]);
    std::printf("%s %.3g%s\n", names[i], e, e <= tolerance ? "" : " FAIL");
    if (!(e <= tolerance)) status = 1;
  }
  return status;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 12) usage("expected 11 arguments");
  Case c;
  c.kernels = argv[1];
  const std::string dtype = argv[2];
  c.B = std::atoll(argv[3]), c.T = std::atoll(argv[4]), c.S = std::atoll(argv[5]), c.H = std::atoll(argv[6]);
  c.D = std::atoll(argv[7]);
  c.mode = argv[8];
  c.causal = std::atoi(argv[9]) != 0;
  if (std::string(argv[10]) != "-") {
    std::stringstream list(argv[10]);
    for (std::string n; std::getline(list, n, ',');) c.valid.push_back(std::atoll(n.c_str()));
    if (int64_t(c.valid.size()) != c.B) usage("VALID needs one frame count per video");
    for (int64_t frames : c.valid)
      if (frames < 1 || frames > c.T) usage("VALID frame counts are 1..T, as skyloom.ops accepts");
  }
  c.scale = 1.0 / std::sqrt(double(c.D));
  if (c.kernels != "general" && c.kernels != "mma" && c.kernels != "wmma" && c.kernels != "temporal")
    usage("unknown kernels " + c.kernels);
  if (c.mode != "full" && c.mode != "spatial" && c.mode != "temporal") usage("unknown mode " + c.mode);
  if (c.kernels == "temporal" && (c.mode != "temporal" || c.T < 1 || c.T > kTemporalMaxFrames))
    usage("the temporal kernels take temporal mode with T in 1..64");
  if (dtype != "f32" && dtype != "f16" && dtype != "bf16") usage("unknown dtype " + dtype);
  const DType type = dtype == "f32" ? DType::kFloat32 : dtype == "f16" ? DType::kFloat16 : DType::kBFloat16;
  const double tolerance = dtype == "f32" ? 2e-5 : dtype == "f16" ? 4e-3 : 3e-2;
  return dispatch(type, c.D, [&](auto tag, auto dim) {
    return run<decltype(tag), decltype(dim)::value>(c, argv[11], tolerance);
  });
}
