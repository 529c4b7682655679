// Fused CPU kernels of the optimizer update rules (loaded by taciturn/kernels/__init__.py,
// called through taciturn/kernels/update.py).
//
// Each update reads every tensor once and writes its state and the parameter in the same pass
// (AMSGrad: reads g, m, v, v^, x, writes m, v, v^, x), a tile of kTile elements at a time, where
// the torch path of taciturn/optim/functional.py makes one pass over memory per op. Every element
// rounds as torch's CPU ops do: mul_(b) is one rounding, add_(g, alpha=a) is fma(a, g, x),
// addcmul_(g, g, value=c) is fma(c * g, g, v), addcdiv_(m, d, value=s) is x + (s * m) / d,
// maximum propagates NaN; but the square root is correctly rounded, where torch's (MKL's vsSqrt
// on x86 builds) may be 1 ulp off. The results do not depend on the thread count. The scalars
// come rounded to fp32 from the caller, as torch rounds a Python float for an fp32 tensor.
#include "common.h"

#include <omp.h>
#if defined(__SSE__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace {

constexpr int64_t kAlign = 16;   // elements per 64-byte line: threads never share a line
constexpr int64_t kTile = 1024;  // elements per tile: its scratch stays in L1

using tac::parallel;

// Element cut of thread t out of n, on a multiple of kAlign.
int64_t cut(int64_t numel, int t, int n) { return t == n ? numel : (numel * t / n) & ~(kAlign - 1); }

// f(i0, n) for every tile [i0, i0 + n) of [0, numel), each thread taking a contiguous range.
template <class F>
void for_tiles(int64_t numel, int threads, F f) {
  parallel(threads, [&](int t, int n) {
    const int64_t hi = cut(numel, t + 1, n);
    for (int64_t i0 = cut(numel, t, n); i0 < hi; i0 += kTile) f(i0, std::min(kTile, hi - i0));
  });
}

// The scalars of Adam's moments: m = b1 m + a1 g ; v = b2 v + a2 g^2 (a1 = 1 - b1, a2 = 1 - b2).
struct Betas {
  float b1, a1, b2, a2;
};

// v.mul_(b2).addcmul_(g, g, value=a2).
inline float square_ema(float b2, float a2, float g, float v) { return std::fma(a2 * g, g, v * b2); }

// exp_avg.mul_(b1).add_(g, alpha=a1) and exp_avg_sq.mul_(b2).addcmul_(g, g, value=a2).
inline void moments(const Betas& c, float g, float& m, float& v) {
  m = std::fma(c.a1, g, m * c.b1);
  v = square_ema(c.b2, c.a2, g, v);
}

// torch.maximum(a, b): NaN when either is.
inline float maximum(float a, float b) { return b > a || b != b ? b : a; }

// x = x + (step * m) / d over a tile, d holding the denominators.
void descend(float* __restrict x, const float* __restrict m, const float* __restrict d, float step, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) x[i] = x[i] + step * m[i] / d[i];
}

// AMSGrad over one tile of n <= kTile elements (the pointers are the tile's).
void amsgrad_tile(float* __restrict x, const float* __restrict g, float* __restrict m, float* __restrict v,
                  float* __restrict vmax, const Betas& c, float eps, float step, int64_t n) {
  alignas(64) float d[kTile];
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    float mi = m[i], vi = v[i];
    moments(c, g[i], mi, vi);
    const float top = maximum(vmax[i], vi);
    m[i] = mi;
    v[i] = vi;
    vmax[i] = top;
    d[i] = top + eps;
  }
  tac::sqrt_tile(d, n);
  descend(x, m, d, step, n);
}

// Adam over one tile.
void adam_tile(float* __restrict x, const float* __restrict g, float* __restrict m, float* __restrict v,
               const Betas& c, float c2, float eps, float step, int64_t n) {
  alignas(64) float d[kTile];
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    float mi = m[i], vi = v[i];
    moments(c, g[i], mi, vi);
    m[i] = mi;
    v[i] = vi;
    d[i] = vi / c2;
  }
  tac::sqrt_tile(d, n);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) d[i] += eps;
  descend(x, m, d, step, n);
}

// The heavy ball over one tile. mu buf is rounded before g is added (torch's mul_ then add_):
// two loops, so that the compiler cannot fuse them into one fma.
void momentum_tile(float* __restrict buf, const float* __restrict g, float* __restrict out, float mu, int64_t n) {
  alignas(64) float d[kTile];
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) d[i] = buf[i] * mu;
  if (!out) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) buf[i] = d[i] + g[i];
    return;
  }
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    buf[i] = d[i] + g[i];
    out[i] = std::fma(mu, buf[i], g[i]);
  }
}

}  // namespace

extern "C" {

// AMSGrad, eps inside the root, no bias correction: m = b1 m + a1 g ; v = b2 v + a2 g^2 ;
// v^ = max(v^, v) ; x = x + step m / sqrt(v^ + eps), step being -lr.
void tac_amsgrad(float* x, const float* g, float* m, float* v, float* vmax, int64_t numel, float b1, float a1,
                 float b2, float a2, float eps, float step, int threads) {
  const Betas c{b1, a1, b2, a2};
  for_tiles(numel, threads, [&](int64_t i, int64_t n) {
    amsgrad_tile(x + i, g + i, m + i, v + i, vmax + i, c, eps, step, n);
  });
}

// Adam, eps outside the root: the moments as above ; x = x + step m / (sqrt(v / c2) + eps), with
// c2 = 1 - b2^t and step = -lr / (1 - b1^t), or c2 = 1 and step = -lr without bias correction.
void tac_adam(float* x, const float* g, float* m, float* v, int64_t numel, float b1, float a1, float b2, float a2,
              float c2, float eps, float step, int threads) {
  const Betas c{b1, a1, b2, a2};
  for_tiles(numel, threads,
            [&](int64_t i, int64_t n) { adam_tile(x + i, g + i, m + i, v + i, c, c2, eps, step, n); });
}

// v = b2 v + a2 g^2 alone (the magnitude profile's EMA, taciturn/profile.py).
void tac_square_ema(float* v, const float* g, int64_t numel, float b2, float a2, int threads) {
  for_tiles(numel, threads, [&](int64_t i0, int64_t n) {
    float* __restrict vs = v + i0;
    const float* __restrict gs = g + i0;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) vs[i] = square_ema(b2, a2, gs[i], vs[i]);
  });
}

// Heavy ball: buf = mu buf + g ; with `out` (nullable, Nesterov) also out = g + mu buf.
void tac_momentum(float* buf, const float* g, float* out, int64_t numel, float mu, int threads) {
  for_tiles(numel, threads,
            [&](int64_t i, int64_t n) { momentum_tile(buf + i, g + i, out ? out + i : nullptr, mu, n); });
}

}  // extern "C"
