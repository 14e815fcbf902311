// Row-wise operations of the transformer blocks on all cores: LayerNorm and the GEGLU activation.
//
// Built and loaded by sd_mlx/cpu_rowwise.py (see there and sd_mlx/native.py). MLX's CPU backend runs these on one
// thread in several passes over memory (a (8192, 320) LayerNorm took 6.7-7.3 ms on a 2-core x86 CPU, 8x an
// element-wise add); here each row is read once from memory and written once, rows split over threads.
//
// Layout: float32, row-major, rows of contiguous channels.
#include <algorithm>
#include <cmath>

#include "parallel.h"
#include "simd.h"

namespace {

using namespace sd_mlx_simd;

// f(r0, r1) over [0, n) rows on up to `threads` threads, at least 16 rows a thread (parallel.h).
template <class F>
void parallel_rows(long n, int threads, const F& f) {
  sd_mlx_parallel::ranges(n, (int)std::max(1L, std::min<long>(threads, n / 16)), f);
}

// 1 + erf(z) with a relative error of a few float32 ulps everywhere: erfc(|z|) = t exp(-z^2 + P(t)),
// t = 1 / (1 + |z| / 2), P the degree-9 Chebyshev fit of Numerical Recipes' erfcc (fractional error < 1.2e-7), and
// 1 + erf(z) = 2 - erfc(z) for z >= 0, erfc(-z) for z < 0 (no cancellation on either side).
inline vs one_plus_erf(vs z) {
  const vs a = z < 0.0f ? -z : z;
  const vs t = 1.0f / (1.0f + 0.5f * a);
  vs p = vs{} + 0.17087277f;
  p = p * t - 0.82215223f;
  p = p * t + 1.48851587f;
  p = p * t - 1.13520398f;
  p = p * t + 0.27886807f;
  p = p * t - 0.18628806f;
  p = p * t + 0.09678418f;
  p = p * t + 0.37409196f;
  p = p * t + 1.00002368f;
  p = p * t - 1.26551223f;
  const vs erfc = t * vexp<vs, vsi>(p - a * a);
  return z < 0.0f ? erfc : 2.0f - erfc;
}

inline float one_plus_erf1(float z) {
  const float a = std::fabs(z), t = 1.0f / (1.0f + 0.5f * a);
  const float p = -1.26551223f + t * (1.00002368f + t * (0.37409196f + t * (0.09678418f + t * (-0.18628806f +
                  t * (0.27886807f + t * (-1.13520398f + t * (1.48851587f + t * (-0.82215223f + t * 0.17087277f))))))));
  const float erfc = t * std::exp(p - a * a);
  return z < 0.0f ? erfc : 2.0f - erfc;
}

}  // namespace

extern "C" {

// y[r] = (x[r] - mean) / sqrt(var + eps) * weight + bias for each of `rows` rows of C values (mean and biased
// variance of the row, two passes over it while it is in cache, float32 sums in SW lanes). Returns 0, or 1 for
// a non-positive size.
int sd_mlx_layer_norm_f32(const float* x, const float* weight, const float* bias, float* y, long rows, int C,
                          float eps, int threads) {
  if (rows <= 0 || C <= 0) return 1;
  parallel_rows(rows, threads, [&](long r0, long r1) {
    for (long r = r0; r < r1; ++r) {
      const float* xr = x + r * C;
      float* yr = y + r * C;
      vs s0 = vs{}, s1 = vs{};
      int c = 0;
      for (; c + 2 * SW <= C; c += 2 * SW) s0 += vload_t<vs>(xr + c), s1 += vload_t<vs>(xr + c + SW);
      float sum = hsum(s0 + s1);
      for (; c < C; ++c) sum += xr[c];
      const float mean = sum / C;
      s0 = vs{}, s1 = vs{};
      for (c = 0; c + 2 * SW <= C; c += 2 * SW) {
        const vs d0 = vload_t<vs>(xr + c) - mean, d1 = vload_t<vs>(xr + c + SW) - mean;
        s0 += d0 * d0, s1 += d1 * d1;
      }
      float ss = hsum(s0 + s1);
      for (; c < C; ++c) ss += (xr[c] - mean) * (xr[c] - mean);
      const float rstd = 1.0f / std::sqrt(ss / C + eps);
      for (c = 0; c + SW <= C; c += SW)
        vstore_t(yr + c, (vload_t<vs>(xr + c) - mean) * rstd * vload_t<vs>(weight + c) + vload_t<vs>(bias + c));
      for (; c < C; ++c) yr[c] = (xr[c] - mean) * rstd * weight[c] + bias[c];
    }
  });
  return 0;
}

// GEGLU: with a = h[r, :n] + bias[:n] and g = h[r, n:] + bias[n:] (bias may be null), y[r] = a * gelu(g), the
// exact GELU g (1 + erf(g / sqrt(2))) / 2, for each of `rows` rows of h (2n values) and y (n values). Returns 0, or
// 1 for a non-positive size.
int sd_mlx_geglu_f32(const float* h, const float* bias, float* y, long rows, int n, int threads) {
  if (rows <= 0 || n <= 0) return 1;
  constexpr float kInvSqrt2 = 0.70710678118654752f;
  parallel_rows(rows, threads, [&](long r0, long r1) {
    for (long r = r0; r < r1; ++r) {
      const float* a = h + r * 2L * n;
      const float* g = a + n;
      float* yr = y + r * n;
      int c = 0;
      for (; c + SW <= n; c += SW) {
        vs av = vload_t<vs>(a + c), gv = vload_t<vs>(g + c);
        if (bias) av += vload_t<vs>(bias + c), gv += vload_t<vs>(bias + n + c);
        vstore_t(yr + c, av * (0.5f * gv * one_plus_erf(gv * kInvSqrt2)));
      }
      for (; c < n; ++c) {
        const float av = a[c] + (bias ? bias[c] : 0.0f), gv = g[c] + (bias ? bias[n + c] : 0.0f);
        yr[c] = av * (0.5f * gv * one_plus_erf1(gv * kInvSqrt2));
      }
    }
  });
  return 0;
}

}  // extern "C"
