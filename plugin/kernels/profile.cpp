// Fused CPU kernel of the magnitude profile's decode weights (taciturn/profile.py; loaded by
// taciturn/kernels/__init__.py). For every piece b (a block) with its tensor's floor f_b:
//   a_i = sqrt(p_i + f_b),  norm_b = mean(a) (l1) or sqrt(mean(a^2)) (l2),
//   w_i = a_i / norm_b, or 1 for every element of a block whose norm is 0,
// in two passes over the block while it is in cache, where the torch path makes about eight
// over the whole bucket. The floors come from tac_profile_means. Every sum is taken in an order
// that does not depend on the thread count (float within a tile, double across tiles and
// segments), so neither do the weights; they differ from the torch path's by rounding only
// (torch's own means depend on its thread count).
#include "common.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {
enum Scale { kL1 = 1, kL2 = 2 };
constexpr int64_t kSegment = 1 << 16;  // elements per partial sum of a long piece
constexpr int64_t kTile = 2048;        // elements summed in float before the double total
}  // namespace

extern "C" {

// Mean of p over every piece (a bucket's tensors): partial sums over segments of kSegment
// elements, in parallel, added in order.
void tac_profile_means(const float* p, const int64_t* runs, int64_t nruns, float* means, int threads) {
  int64_t index = 0;
  for (int64_t r = 0; r < nruns; index += runs[3 * r + 1], ++r) {
    const int64_t len = runs[3 * r + 2], segments = (len + kSegment - 1) / kSegment;
    std::vector<double> partial(segments);
    for (int64_t k = 0; k < runs[3 * r + 1]; ++k) {
      const int64_t start = runs[3 * r] + k * len;
      tac::parallel(segments > 1 ? threads : 1, [&](int t, int n) {
        for (int64_t j = t; j < segments; j += n) {
          const int64_t i1 = std::min(len, (j + 1) * kSegment);
          double sum = 0;
          for (int64_t i = j * kSegment; i < i1; ++i) sum += p[start + i];
          partial[j] = sum;
        }
      });
      double sum = 0;
      for (double v : partial) sum += v;
      means[index + k] = static_cast<float>(sum / double(len));
    }
  }
}

void tac_profile_weights(const float* p, const int64_t* runs, int64_t nruns, int64_t numel, const float* floors,
                         int scale, float* out, int threads) {
  tac::parallel(threads, [&](int t, int n) {
    const int64_t lo = numel * t / n, hi = numel * (t + 1) / n;
    tac::for_pieces(runs, nruns, lo, hi, [&](const tac::Piece& b) {
      if (b.start < lo) return;  // the thread whose range holds its start does it
      const float f = floors[b.index];
      double sum = 0;
      for (int64_t t0 = b.start; t0 < b.end; t0 += kTile) {  // float within a tile, double across
        const int64_t t1 = std::min(b.end, t0 + kTile);
        float* a = out + t0;
        const int64_t len = t1 - t0;
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) a[i] = p[t0 + i] + f;
        tac::sqrt_tile(a, len);
        sum += tac::tile_sum(a, len, scale == kL2);  // a >= 0: the sum of |a| is that of a
      }
      const double mean = sum / double(b.end - b.start);
      const float norm = static_cast<float>(scale == kL2 ? std::sqrt(mean) : mean);
      if (norm > 0.0f) {
        const float inverse = 1.0f / norm;
        for (int64_t i = b.start; i < b.end; ++i) out[i] *= inverse;
      } else {
        for (int64_t i = b.start; i < b.end; ++i) out[i] = 1.0f;
      }
    });
  });
}

}  // extern "C"
