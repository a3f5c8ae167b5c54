// Element types the CPU kernels read and write, and their conversions to the float types
// they accumulate in. torch-free: the bindings reinterpret torch's Half/BFloat16 storage
// (IEEE binary16 and the top half of a binary32) as these structs.
#pragma once

#include <cstdint>
#include <cstring>

namespace skyloom {

enum class DType { kFloat32, kFloat64, kFloat16, kBFloat16 };

struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float to_float(BFloat16 x) { return bits_to_float(uint32_t(x.bits) << 16); }

inline BFloat16 to_bfloat16(float f) {
  uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return BFloat16{uint16_t((u >> 16) | 0x40)};  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
  return BFloat16{uint16_t(u >> 16)};
}

inline float to_float(Half x) {
  const uint32_t sign = uint32_t(x.bits & 0x8000u) << 16;
  const uint32_t exponent = (x.bits >> 10) & 0x1fu;
  const uint32_t mantissa = x.bits & 0x3ffu;
  if (exponent == 0x1fu) return bits_to_float(sign | 0x7f800000u | (mantissa << 13));  // inf, NaN
  if (exponent != 0) return bits_to_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
  // zero or subnormal: mantissa · 2^-24, exact in binary32
  const float magnitude = float(mantissa) * 5.9604644775390625e-8f;
  return sign ? -magnitude : magnitude;
}

inline Half to_half(float f) {
  const uint32_t u = float_to_bits(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return Half{uint16_t(sign | 0x7e00u)};  // NaN
  if (a >= 0x477ff000u) return Half{uint16_t(sign | 0x7c00u)};  // rounds to >= 65520: inf
  if (a < 0x38800000u) {
    // subnormal or zero in binary16: round |f| / 2^-24 to the nearest integer, ties to even.
    // Adding 0.5 (= 2^-1) in binary32 makes the FPU do the rounding for us.
    const float scaled = bits_to_float(a) * 16777216.0f;  // exact: power-of-two scaling
    const uint32_t r = float_to_bits(scaled + 8388608.0f) - 0x4b000000u;
    return Half{uint16_t(sign | r)};
  }
  // normal: rebias the exponent and round the mantissa to 10 bits, ties to even
  uint32_t r = a - 0x38000000u;  // exponent 127 -> 15 bias
  r += 0xfffu + ((r >> 13) & 1u);
  return Half{uint16_t(sign | (r >> 13))};
}

// Load/store between a storage type and an accumulation type.
template <class Acc> inline Acc load_as(float x) { return Acc(x); }
template <class Acc> inline Acc load_as(double x) { return Acc(x); }
template <class Acc> inline Acc load_as(Half x) { return Acc(to_float(x)); }
template <class Acc> inline Acc load_as(BFloat16 x) { return Acc(to_float(x)); }

template <class T> struct StoreAs;
template <> struct StoreAs<float> {
  template <class Acc> static float from(Acc x) { return float(x); }
};
template <> struct StoreAs<double> {
  template <class Acc> static double from(Acc x) { return double(x); }
};
template <> struct StoreAs<Half> {
  template <class Acc> static Half from(Acc x) { return to_half(float(x)); }
};
template <> struct StoreAs<BFloat16> {
  template <class Acc> static BFloat16 from(Acc x) { return to_bfloat16(float(x)); }
};

inline int64_t element_size(DType dtype) {
  switch (dtype) {
    case DType::kFloat64: return 8;
    case DType::kFloat32: return 4;
    default: return 2;
  }
}

}  // namespace skyloom
