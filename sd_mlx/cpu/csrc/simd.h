// Vector types and a vectorised exp shared by sd_mlx's C++ CPU kernels (sd_mlx/csrc/*.cpp; sd_mlx/native.py
// includes this header in each kernel's build key).
#pragma once

#include <cstring>

namespace sd_mlx_simd {

// vs: 16 float lanes where the compiler targets AVX-512, else 8 (GCC's emulation of 16-lane vectors on AVX2 is
// 2.5x slower than 8-lane code); vsi: the int vector of the same lanes.
#ifdef __AVX512F__
typedef float vs __attribute__((vector_size(64)));
typedef int vsi __attribute__((vector_size(64)));
#else
typedef float vs __attribute__((vector_size(32)));
typedef int vsi __attribute__((vector_size(32)));
#endif
constexpr int SW = sizeof(vs) / sizeof(float);  // lanes of vs

template <class V>
inline V vload_t(const float* p) {
  V r;
  std::memcpy(&r, p, sizeof r);
  return r;
}
template <class V>
inline void vstore_t(float* p, V v) { std::memcpy(p, &v, sizeof v); }

// The sum of the SW lanes of v.
inline float hsum(vs v) {
  float s = 0.0f;
  for (int i = 0; i < SW; ++i) s += v[i];
  return s;
}

// e^x for x <= 0: x = n ln2 + r with |r| <= ln2 / 2, e^r by a degree-7 polynomial (Cephes expf coefficients),
// 2^n put in the exponent bits. Inputs below -87 give about 1e-38 instead of a denormal or 0; NaN stays NaN.
// V is a float vector type, VI the int vector of the same lanes.
template <class V, class VI>
inline V vexp(V x) {
  const V lo = V{} - 87.0f;
  V y = x < lo ? lo : x;
  const V n = (y * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest (|n| < 2^22)
  V r = y - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  V p = V{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const VI bits = (__builtin_convertvector(n, VI) + 127) << 23;
  V scale;
  std::memcpy(&scale, &bits, sizeof scale);
  p = p * scale;
  return x != x ? x : p;
}

}  // namespace sd_mlx_simd
