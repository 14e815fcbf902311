// Splitting work over threads, shared by sd_mlx's C++ CPU kernels (sd_mlx/csrc/*.cpp; sd_mlx/native.py includes
// this header in each kernel's build key).
#pragma once

#include <algorithm>
#include <thread>
#include <vector>

namespace sd_mlx_parallel {

// Run f(i0, i1) over [0, n) split in up to `threads` contiguous parts of equal size, each on its own thread, the
// calling thread taking the first part and any part whose thread could not be started.
template <class F>
void ranges(long n, int threads, const F& f) {
  threads = (int)std::max(1L, std::min<long>(threads, n));
  if (threads == 1) {
    if (n > 0) f(0L, n);
    return;
  }
  std::vector<std::thread> pool;
  std::vector<int> missed;
  pool.reserve(threads), missed.reserve(threads);  // no allocation (and no throw) while threads run
  for (int i = 1; i < threads; ++i) {
    try {
      pool.emplace_back([&, i] { f(n * i / threads, n * (i + 1) / threads); });
    } catch (...) {
      missed.push_back(i);
    }
  }
  f(0L, n / threads);
  for (int i : missed) f(n * i / threads, n * (i + 1) / threads);
  for (auto& t : pool) t.join();
}

}  // namespace sd_mlx_parallel
