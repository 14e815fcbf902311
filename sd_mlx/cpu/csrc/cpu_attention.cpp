// Fused multi-head attention for CPUs: softmax(q k^T * scale) v in one pass over key blocks ("online softmax",
// Milakov & Gimelshein 2018; the blocking of FlashAttention, Dao et al. 2022), on all cores.
//
// Built and loaded by sd_mlx/cpu_attention.py (g++ -O3 -march=native, see there). MLX's CPU backend runs its
// element-wise kernels on one thread and materialises every score block; this kernel keeps each block of scores
// in cache, computes exp with a vectorised polynomial and spreads (batch, head, query block) items over threads.
//
// Layout: token-major float32, as the projections produce it: q (B, L, q_row), k and v (B, S, kv_row),
// out (B, L, o_row); head h of a token is the D values starting at column h * D. Results agree with a float64
// reference to about 1e-6 relative (float32 accumulation in a different order than a BLAS product).
#include <algorithm>
#include <atomic>
#include <cstring>
#include <thread>
#include <vector>

#include "simd.h"

namespace {

typedef float v8f __attribute__((vector_size(32)));
typedef int v8i __attribute__((vector_size(32)));

inline v8f vset(float x) { return v8f{x, x, x, x, x, x, x, x}; }
inline v8f vload(const float* p) {
  v8f r;
  std::memcpy(&r, p, sizeof r);
  return r;
}
inline void vstore(float* p, v8f v) { std::memcpy(p, &v, sizeof v); }

// The softmax pass works on simd.h's vs vectors: 16 lanes where the CPU has AVX-512 (half the instructions of 8
// lanes: the 4096-token SD1.5 call 293 -> 268 ms on a 2-core AMD EPYC), else 8.
using namespace sd_mlx_simd;

// c[r][0:8 NV] (= or +=) sum over t < T of a[r * a_stride + t] * b[t * b_stride + 0:8 NV], for r < R.
// R x NV accumulators stay in registers (6 x 2 uses 12 of AVX2's 16).
template <int R, int NV, bool ACCUMULATE>
inline void micro(const float* a, long a_stride, const float* b, long b_stride, int T, float* c, long c_stride) {
  v8f acc[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int n = 0; n < NV; ++n) acc[r][n] = ACCUMULATE ? vload(c + r * c_stride + 8 * n) : vset(0.0f);
  for (int t = 0; t < T; ++t) {
    v8f bv[NV];
#pragma GCC unroll 4
    for (int n = 0; n < NV; ++n) bv[n] = vload(b + t * b_stride + 8 * n);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const v8f x = vset(a[r * a_stride + t]);
#pragma GCC unroll 4
      for (int n = 0; n < NV; ++n) acc[r][n] += x * bv[n];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int n = 0; n < NV; ++n) vstore(c + r * c_stride + 8 * n, acc[r][n]);
}

constexpr int RT = 6;   // query rows per register tile
constexpr int BQ = 96;  // query rows per work item (a multiple of RT)
constexpr int BK = 256; // keys per block (a multiple of 16)

struct Problem {
  const float *q, *k, *v;
  float* out;
  int B, L, S, H, D;
  long q_row, kv_row, o_row;
  float scale;
  int Dp, Sp;         // D rounded up to 8, S rounded up to 16 (zero padding)
  float *kt, *vp;     // per (b, h): keys in 16-key tiles [S/16][Dp][16], values [Sp][Dp]
};

// Copy the keys of (b, h) into 16-key tiles, transposed (each tile is Dp rows of 16 keys), and its values into
// dense rows of Dp: the inner loops then read memory contiguously.
void pack(const Problem& p, int bh) {
  const int b = bh / p.H, h = bh % p.H;
  float* kt = p.kt + (long)bh * p.Dp * p.Sp;
  float* vp = p.vp + (long)bh * p.Sp * p.Dp;
  std::memset(kt, 0, sizeof(float) * p.Dp * p.Sp);
  std::memset(vp, 0, sizeof(float) * p.Sp * p.Dp);
  for (int s = 0; s < p.S; ++s) {
    const float* kr = p.k + ((long)b * p.S + s) * p.kv_row + (long)h * p.D;
    const float* vr = p.v + ((long)b * p.S + s) * p.kv_row + (long)h * p.D;
    float* tile = kt + (long)(s / 16) * p.Dp * 16 + (s % 16);
    for (int d = 0; d < p.D; ++d) tile[d * 16] = kr[d];
    std::memcpy(vp + (long)s * p.Dp, vr, sizeof(float) * p.D);
  }
}

// One work item: BQ query rows of one (b, h) against all keys. Scratch: qb and ob (BQ x Dp), sb (BQ x BK),
// m and l (BQ): running row maxima and softmax denominators.
void query_block(const Problem& p, int item, float* scratch) {
  const int Dp = p.Dp, Sp = p.Sp;
  float* qb = scratch;
  float* ob = qb + BQ * Dp;
  float* sb = ob + BQ * Dp;
  float* m = sb + BQ * BK;
  float* l = m + BQ;
  const int blocks = (p.L + BQ - 1) / BQ;
  const int bh = item / blocks, i0 = (item % blocks) * BQ;
  const int b = bh / p.H, h = bh % p.H;
  const int rows = std::min(BQ, p.L - i0);
  const int tiled = (rows + RT - 1) / RT * RT;
  const float* kt = p.kt + (long)bh * Dp * Sp;
  const float* vp = p.vp + (long)bh * Sp * Dp;

  std::memset(qb, 0, sizeof(float) * BQ * Dp);
  std::memset(ob, 0, sizeof(float) * BQ * Dp);
  for (int r = 0; r < rows; ++r) {
    const float* qr = p.q + ((long)b * p.L + i0 + r) * p.q_row + (long)h * p.D;
    for (int d = 0; d < p.D; ++d) qb[r * Dp + d] = qr[d] * p.scale;
  }
  for (int r = 0; r < BQ; ++r) {
    m[r] = -3.0e38f;
    l[r] = 0.0f;
  }
  for (int j0 = 0; j0 < Sp; j0 += BK) {
    const int nb = std::min(BK, Sp - j0);
    const int valid = std::min(nb, p.S - j0);
    for (int c = 0; c < nb; c += 16) {
      const float* tile = kt + (long)((j0 + c) / 16) * Dp * 16;
      for (int r0 = 0; r0 < tiled; r0 += RT) micro<RT, 2, false>(qb + r0 * Dp, Dp, tile, 16, Dp, sb + r0 * BK + c, BK);
    }
    for (int r = 0; r < tiled; ++r) {
      float* sr = sb + r * BK;
      for (int c = valid; c < nb; ++c) sr[c] = -3.0e38f;  // padded keys get exp(...) = ~0
      // Row maximum and exp(s - max) with its sum, SW lanes at a time, two independent accumulators each.
      vs m0 = vload_t<vs>(sr), m1 = m0;
      int c = SW;
      for (; c + 2 * SW <= nb; c += 2 * SW) {
        const vs x0 = vload_t<vs>(sr + c), x1 = vload_t<vs>(sr + c + SW);
        m0 = m0 > x0 ? m0 : x0;
        m1 = m1 > x1 ? m1 : x1;
      }
      if (c < nb) {
        const vs x0 = vload_t<vs>(sr + c);
        m0 = m0 > x0 ? m0 : x0;
      }
      m0 = m0 > m1 ? m0 : m1;
      float mnew = m[r];
      for (int i = 0; i < SW; ++i) mnew = std::max(mnew, m0[i]);
      const float alpha = mnew == m[r] ? 1.0f : vexp<v8f, v8i>(vset(m[r] - mnew))[0];
      m[r] = mnew;
      vs s0 = vs{}, s1 = vs{};
      for (c = 0; c + 2 * SW <= nb; c += 2 * SW) {
        const vs e0 = vexp<vs, vsi>(vload_t<vs>(sr + c) - mnew), e1 = vexp<vs, vsi>(vload_t<vs>(sr + c + SW) - mnew);
        s0 += e0;
        s1 += e1;
        vstore_t(sr + c, e0);
        vstore_t(sr + c + SW, e1);
      }
      if (c < nb) {
        const vs e0 = vexp<vs, vsi>(vload_t<vs>(sr + c) - mnew);
        s0 += e0;
        vstore_t(sr + c, e0);
      }
      l[r] = l[r] * alpha + hsum(s0 + s1);
      if (alpha != 1.0f) {
        float* o = ob + r * Dp;
        for (int d = 0; d < Dp; d += 8) vstore(o + d, vload(o + d) * alpha);
      }
    }
    for (int r0 = 0; r0 < tiled; r0 += RT) {
      int d = 0;
      for (; d + 16 <= Dp; d += 16)
        micro<RT, 2, true>(sb + r0 * BK, BK, vp + (long)j0 * Dp + d, Dp, nb, ob + r0 * Dp + d, Dp);
      for (; d < Dp; d += 8)
        micro<RT, 1, true>(sb + r0 * BK, BK, vp + (long)j0 * Dp + d, Dp, nb, ob + r0 * Dp + d, Dp);
    }
  }
  for (int r = 0; r < rows; ++r) {
    float* orow = p.out + ((long)b * p.L + i0 + r) * p.o_row + (long)h * p.D;
    const float inv = 1.0f / l[r];
    for (int d = 0; d < p.D; ++d) orow[d] = ob[r * Dp + d] * inv;
  }
}

// Run f(thread, item) for item < n on up to `threads` threads (the calling one included), items handed out in
// order from a shared counter.
template <class F>
void parallel_for(int n, int threads, F f) {
  threads = std::max(1, std::min(threads, n));
  std::atomic<int> next{0};
  auto worker = [&](int t) {
    for (int i = next.fetch_add(1); i < n; i = next.fetch_add(1)) f(t, i);
  };
  std::vector<std::thread> pool;
  for (int t = 1; t < threads; ++t) {
    try {
      pool.emplace_back(worker, t);
    } catch (...) {  // no more threads: the started ones and this one share the items
      break;
    }
  }
  worker(0);
  for (auto& th : pool) th.join();
}

}  // namespace

// Returns 0 on success, 1 for a non-positive size, 2 when memory could not be allocated (out is then untouched).
extern "C" int sd_mlx_attention_f32(const float* q, const float* k, const float* v, float* out, int B, int L, int S,
                                    int H, int D, long q_row, long kv_row, long o_row, float scale, int threads) {
  if (B <= 0 || L <= 0 || S <= 0 || H <= 0 || D <= 0) return 1;
  Problem p{q, k, v, out, B, L, S, H, D, q_row, kv_row, o_row, scale, (D + 7) / 8 * 8, (S + 15) / 16 * 16,
            nullptr, nullptr};
  const int items = B * H * ((L + BQ - 1) / BQ);
  threads = std::max(1, std::min(threads, items));
  try {
    std::vector<float> kt((size_t)B * H * p.Dp * p.Sp), vp((size_t)B * H * p.Sp * p.Dp);
    std::vector<std::vector<float>> scratch(threads, std::vector<float>((size_t)2 * BQ * p.Dp + BQ * BK + 2 * BQ));
    p.kt = kt.data();
    p.vp = vp.data();
    parallel_for(B * H, threads, [&](int, int bh) { pack(p, bh); });
    parallel_for(items, threads, [&](int t, int item) { query_block(p, item, scratch[t].data()); });
  } catch (...) {  // std::bad_alloc
    return 2;
  }
  return 0;
}
