// Helpers shared by the kernel files (sign.cpp, topk.cpp, update.cpp), each compiled with them
// into the one library that taciturn/kernels/__init__.py builds.
#pragma once

#include <omp.h>
#if defined(__SSE__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace tac {

// One piece of a segment: its index among the pieces and its element range [start, end).
struct Piece {
  int64_t index, start, end;
};

// f(piece) for every piece overlapping [lo, hi), in order; the pieces are given as runs
// (start, count, length) of consecutive pieces of equal length.
template <class F>
void for_pieces(const int64_t* runs, int64_t nruns, int64_t lo, int64_t hi, F f) {
  int64_t index = 0;
  for (int64_t r = 0; r < nruns; ++r) {
    const int64_t start = runs[3 * r], count = runs[3 * r + 1], len = runs[3 * r + 2];
    const int64_t k0 = std::clamp<int64_t>(lo > start ? (lo - start) / len : 0, 0, count);
    const int64_t k1 = std::clamp<int64_t>(hi > start ? (hi - start + len - 1) / len : 0, 0, count);
    for (int64_t k = k0; k < k1; ++k) f(Piece{index + k, start + k * len, start + (k + 1) * len});
    index += count;
  }
}

// f(thread, threads) on `threads` OpenMP threads (torch's runtime); no OpenMP at all for one
// thread, as in forked processes, which must not start a team.
template <class F>
void parallel(int threads, F f) {
  if (threads <= 1) {
    f(0, 1);
    return;
  }
#pragma omp parallel num_threads(threads)
  f(omp_get_thread_num(), omp_get_num_threads());
}

// Sum of |y| (or of y^2 when `squares`) over y[0, n), in float: one tile of a longer sum.
inline float tile_sum(const float* y, int64_t n, bool squares) {
  float acc = 0;
  if (squares) {
#pragma omp simd reduction(+ : acc)
    for (int64_t i = 0; i < n; ++i) acc += y[i] * y[i];
  } else {
#pragma omp simd reduction(+ : acc)
    for (int64_t i = 0; i < n; ++i) acc += std::fabs(y[i]);
  }
  return acc;
}

// d[0, n) = sqrt(d[0, n)). Vectorized by hand: the compiler keeps std::sqrt scalar (it may set errno).
inline void sqrt_tile(float* d, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(d + i, _mm512_sqrt_ps(_mm512_loadu_ps(d + i)));
#elif defined(__AVX__)
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(d + i, _mm256_sqrt_ps(_mm256_loadu_ps(d + i)));
#elif defined(__SSE__)
  for (; i + 4 <= n; i += 4) _mm_storeu_ps(d + i, _mm_sqrt_ps(_mm_loadu_ps(d + i)));
#endif
  for (; i < n; ++i) d[i] = std::sqrt(d[i]);
}

}  // namespace tac
