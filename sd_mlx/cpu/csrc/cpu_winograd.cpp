// 3x3 convolutions (stride 1, one column of zero padding each side) by Winograd's minimal filtering F(2x2, 3x3) and
// F(4x4, 3x3) (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", CVPR 2016) for CPUs.
//
// Built and loaded by sd_mlx/cpu_winograd.py (see there and sd_mlx/native.py). F(m x m, 3x3) computes each m x m
// output tile from its n x n input tile (n = m + 2) with n^2 products per channel pair instead of 9 m^2 (16 for
// 36 with m = 2, 36 for 144 with m = 4): the input tiles and the kernels are transformed (B^T d B, G g G^T),
// multiplied as n^2 independent matrix products over channels (cblas_sgemm from the optimised BLAS that sd_mlx
// loads into the global scope for MLX), and transformed back (A^T m A). F(2x2) uses only 0, +-1 and +-1/2 and
// agrees with a direct convolution to float32 rounding; F(4x4) (interpolation points 0, +-1, +-2) is about 20
// times less exact: about 1e-5 of the largest output on random data.
//
// Layout: float32, channels last. x (B, Hin, W, C); w (O, 3, 3, C) (MLX's convolution layout); bias (O) or null;
// y (B, Hout, W, O). With pad_rows, Hout = Hin and one zero row is assumed above and below; without, x carries
// its halo rows and Hout = Hin - 2 (a row strip of a larger input).
//
// Working memory stays bounded (budget_bytes for the transformed inputs, as much for the transformed kernels and
// the products): tiles are processed in chunks and, for wide layers, output channels in slices.
#include <dlfcn.h>
#ifdef __AVX__
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

#include "parallel.h"

namespace {

typedef void (*sgemm_t)(int, int, int, int, int, int, float, const float*, int, const float*, int, float, float*,
                        int);
enum { kRowMajor = 101, kNoTrans = 111, kTrans = 112 };
constexpr int CB = 64;  // channels per inner loop (vectorised by the compiler)

sgemm_t find_sgemm() { return reinterpret_cast<sgemm_t>(dlsym(RTLD_DEFAULT, "cblas_sgemm")); }

// OpenBLAS's thread count (both null otherwise). With it the kernel runs the n^2 products of a chunk as whole
// products on its own threads, the BLAS on one thread each: OpenBLAS splitting each of these short products over
// the cores ran them at 110-160 GFLOP/s on a 2-core x86 CPU, whole products per thread at 165-185. Only for a
// pthreads build of OpenBLAS (openblas_get_parallel() == 1) whose thread functions come from the library that
// provides cblas_sgemm: an OpenMP build sets the count per calling thread (each new thread would run its products
// on all cores), and a serial build may not allow concurrent calls.
struct BlasThreads {
  void (*set)(int);
  int (*get)();
};

bool same_library(const void* a, const void* b) {
  Dl_info ia, ib;
  return dladdr(a, &ia) && dladdr(b, &ib) && ia.dli_fbase == ib.dli_fbase;
}

BlasThreads find_blas_threads(sgemm_t sgemm) {
  const BlasThreads none{nullptr, nullptr};
  BlasThreads t{reinterpret_cast<void (*)(int)>(dlsym(RTLD_DEFAULT, "openblas_set_num_threads")),
                reinterpret_cast<int (*)()>(dlsym(RTLD_DEFAULT, "openblas_get_num_threads"))};
  const auto parallel_kind = reinterpret_cast<int (*)()>(dlsym(RTLD_DEFAULT, "openblas_get_parallel"));
  if (!t.set || !t.get || !parallel_kind || parallel_kind() != 1) return none;
  const void* s = reinterpret_cast<const void*>(sgemm);
  for (const void* f : {reinterpret_cast<const void*>(t.set), reinterpret_cast<const void*>(t.get),
                        reinterpret_cast<const void*>(parallel_kind)})
    if (!same_library(s, f)) return none;
  return t;
}

// f(i0, i1) over [0, n) on up to `threads` threads (parallel.h).
template <class F>
void parallel(long n, int threads, const F& f) {
  sd_mlx_parallel::ranges(n, threads, f);
}

// The transform matrices of F(M x M, 3x3), N = M + 2.
template <int M>
struct Tr;

template <>
struct Tr<2> {
  static constexpr int N = 4;
  static constexpr float BT[4][4] = {{1, 0, -1, 0}, {0, 1, 1, 0}, {0, -1, 1, 0}, {0, 1, 0, -1}};
  static constexpr float G[4][3] = {{1, 0, 0}, {0.5f, 0.5f, 0.5f}, {0.5f, -0.5f, 0.5f}, {0, 0, 1}};
  static constexpr float AT[2][4] = {{1, 1, 1, 0}, {0, 1, -1, -1}};
};

template <>
struct Tr<4> {
  static constexpr int N = 6;
  static constexpr float BT[6][6] = {{4, 0, -5, 0, 1, 0},  {0, -4, -4, 1, 1, 0}, {0, 4, -4, -1, 1, 0},
                                     {0, -2, -1, 2, 1, 0}, {0, 2, -1, -2, 1, 0}, {0, 4, 0, -5, 0, 1}};
  static constexpr float G[6][3] = {{1.0f / 4, 0, 0},
                                    {-1.0f / 6, -1.0f / 6, -1.0f / 6},
                                    {-1.0f / 6, 1.0f / 6, -1.0f / 6},
                                    {1.0f / 24, 1.0f / 12, 1.0f / 6},
                                    {1.0f / 24, -1.0f / 12, 1.0f / 6},
                                    {0, 0, 1}};
  static constexpr float AT[4][6] = {{1, 1, 1, 1, 1, 0}, {0, 1, -1, 2, -2, 0}, {0, 1, 1, 4, 4, 0}, {0, 1, -1, 8, -8, 1}};
};

// out[r][0:nc] = sum over k < K of A[r][k] * in[k][0:nc] for r < R, skipping zero coefficients (the loops are
// unrolled, so the matrix entries are compile-time constants). in and out rows are `stride` floats apart.
template <int R, int K>
inline void combine(const float (&A)[R][K], const float* in, long in_stride, float* const* out, int nc) {
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    float* o = out[r];
    bool first = true;
#pragma GCC unroll 8
    for (int k = 0; k < K; ++k) {
      const float a = A[r][k];
      if (a == 0.0f) continue;
      const float* x = in + k * in_stride;
      if (first) {
        if (a == 1.0f)
          for (int c = 0; c < nc; ++c) o[c] = x[c];
        else if (a == -1.0f)
          for (int c = 0; c < nc; ++c) o[c] = -x[c];
        else
          for (int c = 0; c < nc; ++c) o[c] = a * x[c];
        first = false;
      } else if (a == 1.0f) {
        for (int c = 0; c < nc; ++c) o[c] += x[c];
      } else if (a == -1.0f) {
        for (int c = 0; c < nc; ++c) o[c] -= x[c];
      } else {
        for (int c = 0; c < nc; ++c) o[c] += a * x[c];
      }
    }
  }
}

// dst[0:n] = src[0:n], with streaming (non-temporal) stores where the CPU has AVX and dst is 32-byte aligned: the
// transformed kernels are written once and read by the products much later, so they go to memory without first
// reading each destination line into the cache (SD1.5's 16x16x1280 kernel transform 12-17 -> 6-7 ms on a 2-core
// x86 CPU). The writing thread must run stream_fence() before others read dst.
inline void stream_copy(float* dst, const float* src, int n) {
#ifdef __AVX__
  if ((reinterpret_cast<uintptr_t>(dst) & 31) == 0) {
    int c = 0;
    for (; c + 8 <= n; c += 8) _mm256_stream_ps(dst + c, _mm256_loadu_ps(src + c));
    std::memcpy(dst + c, src + c, (n - c) * sizeof(float));
    return;
  }
#endif
  std::memcpy(dst, src, n * sizeof(float));
}

inline void stream_fence() {
#ifdef __AVX__
  _mm_sfence();
#endif
}

// Kernels of output channels [o0, o1) -> u (N*N, o1 - o0, C): u[i][j] = (G g G^T)[i][j], each row of CB values
// built in a small buffer and streamed out (stream_copy).
template <int M>
void transform_kernels(const float* w, float* u, int o0, int o1, int C, int threads) {
  constexpr int N = Tr<M>::N;
  const long plane = (long)(o1 - o0) * C;
  parallel(o1 - o0, threads, [&](long a, long b) {
    float t[N][3][CB], k[3][3][CB], row[N][CB];
    for (long oo = a; oo < b; ++oo) {
      const float* g = w + (o0 + oo) * 9L * C;
      for (int c0 = 0; c0 < C; c0 += CB) {
        const int nc = std::min(CB, C - c0);
        for (int i = 0; i < 3; ++i)
          for (int j = 0; j < 3; ++j) std::memcpy(k[i][j], g + (i * 3 + j) * (long)C + c0, nc * sizeof(float));
        for (int j = 0; j < 3; ++j) {  // t[:, j] = G k[:, j]
          float* rows[N];
          for (int i = 0; i < N; ++i) rows[i] = t[i][j];
          combine<N, 3>(Tr<M>::G, k[0][j], 3 * CB, rows, nc);
        }
        for (int i = 0; i < N; ++i) {  // u[i, :] = t[i, :] G^T
          float* rows[N];
          for (int j = 0; j < N; ++j) rows[j] = row[j];
          combine<N, 3>(Tr<M>::G, t[i][0], CB, rows, nc);
          for (int j = 0; j < N; ++j) stream_copy(u + (i * N + j) * plane + oo * C + c0, row[j], nc);
        }
      }
    }
    stream_fence();
  });
}

struct Geometry {
  int B, Hin, Hout, W, C, O, top;  // top: input row of output row 0's centre minus one (-1 with zero padding)
  long th, tw;                      // tiles per column and per row
  void tile(long t, int* b, int* ty, int* tx) const {
    *b = (int)(t / (th * tw));
    const long r = t % (th * tw);
    *ty = (int)(r / tw);
    *tx = (int)(r % tw);
  }
};

// Input tiles [t0, t0 + n) -> v (N*N, n, C): v[i][j] = (B^T d B)[i][j].
template <int M>
void transform_inputs(const float* x, float* v, const Geometry& g, long t0, long n, int threads) {
  constexpr int N = Tr<M>::N;
  const int C = g.C;
  parallel(n, threads, [&](long a, long b) {
    float d[N][N][CB], s[N][N][CB];
    for (long lt = a; lt < b; ++lt) {
      int bi, ty, tx;
      g.tile(t0 + lt, &bi, &ty, &tx);
      const float* px[N][N];
      for (int i = 0; i < N; ++i)
        for (int j = 0; j < N; ++j) {
          const int yy = M * ty + g.top + i, xx = M * tx - 1 + j;
          px[i][j] = (yy >= 0 && yy < g.Hin && xx >= 0 && xx < g.W) ? x + (((long)bi * g.Hin + yy) * g.W + xx) * C
                                                                       : nullptr;
        }
      for (int c0 = 0; c0 < C; c0 += CB) {
        const int nc = std::min(CB, C - c0);
        for (int i = 0; i < N; ++i)
          for (int j = 0; j < N; ++j) {
            if (px[i][j])
              std::memcpy(d[i][j], px[i][j] + c0, nc * sizeof(float));
            else
              std::memset(d[i][j], 0, nc * sizeof(float));
          }
        for (int j = 0; j < N; ++j) {  // s[:, j] = B^T d[:, j]
          float* rows[N];
          for (int i = 0; i < N; ++i) rows[i] = s[i][j];
          combine<N, N>(Tr<M>::BT, d[0][j], N * CB, rows, nc);
        }
        for (int i = 0; i < N; ++i) {  // v[i, :] = s[i, :] B
          float* rows[N];
          for (int j = 0; j < N; ++j) rows[j] = v + ((i * N + j) * n + lt) * C + c0;
          combine<N, N>(Tr<M>::BT, s[i][0], CB, rows, nc);
        }
      }
    }
  });
}

// Products m (N*N, n, o1 - o0) of tiles [t0, t0 + n) and output channels [o0, o1) -> y: each M x M output tile is
// A^T m A (+ bias); rows and columns past the output's edge are dropped.
template <int M>
void transform_outputs(const float* m, const float* bias, float* y, const Geometry& g, long t0, long n, int o0,
                       int o1, int threads) {
  constexpr int N = Tr<M>::N;
  const int O = g.O, S = o1 - o0;
  parallel(n, threads, [&](long a, long b) {
    float p[N][N][CB], s[M][N][CB], r[M][M][CB];
    for (long lt = a; lt < b; ++lt) {
      int bi, ty, tx;
      g.tile(t0 + lt, &bi, &ty, &tx);
      for (int c0 = 0; c0 < S; c0 += CB) {
        const int nc = std::min(CB, S - c0);
        for (int i = 0; i < N; ++i)
          for (int j = 0; j < N; ++j) std::memcpy(p[i][j], m + ((i * N + j) * n + lt) * S + c0, nc * sizeof(float));
        for (int j = 0; j < N; ++j) {  // s[:, j] = A^T p[:, j]
          float* rows[M];
          for (int i = 0; i < M; ++i) rows[i] = s[i][j];
          combine<M, N>(Tr<M>::AT, p[0][j], N * CB, rows, nc);
        }
        for (int i = 0; i < M; ++i) {  // r[i, :] = s[i, :] A
          float* rows[M];
          for (int j = 0; j < M; ++j) rows[j] = r[i][j];
          combine<M, N>(Tr<M>::AT, s[i][0], CB, rows, nc);
        }
        for (int i = 0; i < M; ++i) {
          const int yy = M * ty + i;
          if (yy >= g.Hout) break;
          for (int j = 0; j < M && M * tx + j < g.W; ++j) {
            float* out = y + (((long)bi * g.Hout + yy) * g.W + M * tx + j) * O + o0 + c0;
            if (bias)
              for (int c = 0; c < nc; ++c) out[c] = r[i][j][c] + bias[o0 + c0 + c];
            else
              std::memcpy(out, r[i][j], nc * sizeof(float));
          }
        }
      }
    }
  });
}

// The P products m[p] = v[p] u[p]^T of a chunk (n tiles, C input and S output channels): split over the kernel's
// threads with the BLAS on one thread where its thread count can be set (and restored after), else one after
// another, each on all the BLAS's threads.
void products(sgemm_t sgemm, const BlasThreads& bt, int P, const float* v, const float* u, float* m, long n, int S,
              int C, int threads) {
  auto run = [&](long a, long b) {
    for (long p = a; p < b; ++p)
      sgemm(kRowMajor, kNoTrans, kTrans, (int)n, S, C, 1.0f, v + p * n * C, C, u + p * S * C, C, 0.0f,
            m + p * n * S, S);
  };
  if (bt.set && threads > 1 && P >= threads) {
    // Concurrent calls share one saved count: the first in sets one thread, the last out restores it.
    static std::mutex lock;
    static int active = 0, saved = 0;
    struct OneBlasThread {  // restores the count when the last caller leaves, also on an exception
      const BlasThreads& bt;
      explicit OneBlasThread(const BlasThreads& b) : bt(b) {
        std::lock_guard<std::mutex> hold(lock);
        if (active++ == 0) saved = bt.get(), bt.set(1);
      }
      ~OneBlasThread() {
        std::lock_guard<std::mutex> hold(lock);
        if (--active == 0) bt.set(saved);
      }
    } one(bt);
    parallel(P, threads, run);
  } else {
    run(0, P);
  }
}

template <int M>
int convolve(sgemm_t sgemm, const BlasThreads& bt, const float* x, const float* w, const float* bias, float* y,
             Geometry g, long budget_bytes, int threads) {
  constexpr int N = Tr<M>::N, P = N * N;
  const int C = g.C, O = g.O;
  g.th = (g.Hout + M - 1) / M;
  g.tw = (g.W + M - 1) / M;
  const long tiles = (long)g.B * g.th * g.tw;
  const long floats = std::max(1L, budget_bytes / (long)sizeof(float));
  // tiles per chunk: their transformed inputs (P x C values each) within one budget
  // (as many chunks as that needs, of equal size: a short last chunk runs its products slowly)
  const long most = std::min(tiles, std::max(64L, floats / ((long)P * C)));
  const long chunks = (tiles + most - 1) / most;
  const long chunk = (tiles + chunks - 1) / chunks;
  // output channels per slice: their transformed kernels (P x C) and the chunk's products (P x chunk) within the
  // other; the kernels are transformed once when all fit, else once per chunk and slice
  const int slice = (int)std::min<long>(O, std::max(16L, floats / ((long)P * (C + chunk))));
  const bool kernels_once = slice == O;
  float* v = static_cast<float*>(std::malloc(sizeof(float) * P * chunk * C));
  float* m = static_cast<float*>(std::malloc(sizeof(float) * P * chunk * slice));
  // u 64-byte aligned for stream_copy, from a plain malloc (glibc's aligned_alloc of such sizes fragmented the heap:
  // the process grew by 0.3-0.5 GB per SD1.5 U-Net call)
  char* u_raw = static_cast<char*>(std::malloc(sizeof(float) * P * (long)slice * C + 64));
  float* u = u_raw ? reinterpret_cast<float*>(u_raw + (64 - reinterpret_cast<uintptr_t>(u_raw) % 64)) : nullptr;
  if (!v || !m || !u) {
    std::free(v), std::free(m), std::free(u_raw);
    return 2;
  }
  if (kernels_once) transform_kernels<M>(w, u, 0, O, C, threads);
  for (long t0 = 0; t0 < tiles; t0 += chunk) {
    const long n = std::min(chunk, tiles - t0);
    transform_inputs<M>(x, v, g, t0, n, threads);
    for (int o0 = 0; o0 < O; o0 += slice) {
      const int o1 = std::min(O, o0 + slice), S = o1 - o0;
      if (!kernels_once) transform_kernels<M>(w, u, o0, o1, C, threads);
      products(sgemm, bt, P, v, u, m, n, S, C, threads);
      transform_outputs<M>(m, bias, y, g, t0, n, o0, o1, threads);
    }
  }
  std::free(v), std::free(m), std::free(u_raw);
  return 0;
}

}  // namespace

extern "C" {

// 1 when an optimised BLAS's cblas_sgemm is in the process's global scope (the kernel needs it), else 0.
int sd_mlx_winograd_ready() { return find_sgemm() != nullptr; }

// 1 when the products run whole on the kernel's threads with the BLAS set to one thread (a pthreads OpenBLAS, see
// BlasThreads), 0 when they run one after another on the BLAS's own threads.
int sd_mlx_winograd_products_per_thread() {
  const sgemm_t sgemm = find_sgemm();
  return sgemm && find_blas_threads(sgemm).set ? 1 : 0;
}

// tile: 2 for F(2x2, 3x3), 4 for F(4x4, 3x3). Returns 0 on success, 1 for invalid sizes, 2 when memory could not be
// allocated, 3 without cblas_sgemm.
int sd_mlx_winograd_f32(const float* x, const float* w, const float* bias, float* y, int B, int Hin, int W, int C,
                        int O, int pad_rows, int tile, long budget_bytes, int threads) {
  const sgemm_t sgemm = find_sgemm();
  if (!sgemm) return 3;
  Geometry g;
  g.B = B, g.Hin = Hin, g.W = W, g.C = C, g.O = O;
  g.Hout = pad_rows ? Hin : Hin - 2;
  g.top = pad_rows ? -1 : 0;
  if (B < 1 || W < 1 || C < 1 || O < 1 || g.Hout < 1) return 1;
  const BlasThreads bt = find_blas_threads(sgemm);
  if (tile == 2) return convolve<2>(sgemm, bt, x, w, bias, y, g, budget_bytes, threads);
  if (tile == 4) return convolve<4>(sgemm, bt, x, w, bias, y, g, budget_bytes, threads);
  return 1;
}

}  // extern "C"
