// Fused CPU kernels of the scaled sign codecs (loaded by taciturn/kernels/__init__.py).
//
// A segment of `numel` fp32 elements is split into pieces, given as runs (start, count, length)
// of consecutive pieces of equal length. Every piece b gets one scale s_b (mean |y|,
// sqrt(mean y^2) or 1) and one bit per element (y >= 0; element i on bit i % 8 of byte i / 8):
// the payload that the torch path of taciturn.compressors.ScaledSign writes, byte for byte.
//
// Encode reads y = x + alpha * h and updates h in the same pass over each piece:
//   KEEP: h untouched;  MARKOV: h += C(y);  ERROR: h = y - C(y).
// A weighted codec (the magnitude profile, taciturn/profile.py) decodes element i as
// (+-s) * w[i]: every kernel takes w (null: unweighted), indexed like h or out. Its products and
// sums round one at a time, as the torch path's mul_ then add_ do (no contraction into fma).
// A piece of at most kLocal elements is done by one thread, its scale pass and its sign pass
// back to back while it is in cache; longer pieces are cut into segments shared by all threads.
// Pieces whose ends are not on a multiple of 8 share a byte with a neighbour: those bytes are
// OR-ed atomically into zeroed memory, every other byte is stored by exactly one thread.
#include "common.h"

#include <omp.h>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

enum Scale { kUnit = 0, kL1 = 1, kL2 = 2 };
enum Update { kKeep = 0, kMarkov = 1, kError = 2 };

constexpr int64_t kTile = 2048;      // elements per inner tile (its y stays in L1)
constexpr int64_t kLocal = 1 << 16;  // longest piece done by one thread

using tac::for_pieces;
using tac::Piece;

using tac::parallel;

// Element cut of thread t out of n, on a multiple of 8 (threads never share a byte of signs).
int64_t cut(int64_t numel, int t, int n) { return t == n ? numel : (numel * t / n) & ~int64_t(7); }

// Where x is: one array whose x[0] is element `origin`, or `nsegs` arrays, segs[k][0] being
// element starts[k] (starts ascending, the first 0): a bucket's tensors, not copied into one.
// A tile never straddles two arrays (pieces never straddle tensors).
struct Source {
  const float* x;
  int64_t origin = 0;
  const float* const* segs = nullptr;
  const int64_t* starts = nullptr;
  int64_t nsegs = 0;

  const float* at(int64_t i) const {
    if (!segs) return x + (i - origin);
    const int64_t k = std::upper_bound(starts, starts + nsegs, i) - starts - 1;
    return segs[k] + (i - starts[k]);
  }
};

// y = x + alpha * h (h null: y = x), one tile at a time (h[0] is element 0).
struct Input {
  Source x;
  const float* h;
  float alpha;

  // y[i0, i1), y[0] being element i0: x itself, or `buf` filled with x + alpha * h.
  const float* tile(int64_t i0, int64_t i1, float* __restrict buf) const {
    if (!h) return x.at(i0);
    const float* __restrict xs = x.at(i0);
    const float* __restrict hs = h + i0;
    for (int64_t i = 0; i < i1 - i0; ++i) buf[i] = xs[i] + alpha * hs[i];
    return buf;
  }
};

// Sum of |y| (l1) or y^2 (l2) over [i0, i1): float within a tile, double across tiles.
double range_sum(const Input& in, int scale, int64_t i0, int64_t i1) {
  alignas(64) float buf[kTile];
  double total = 0;
  for (int64_t t0 = i0; t0 < i1; t0 += kTile) {
    const int64_t n = std::min(i1, t0 + kTile) - t0;
    total += tac::tile_sum(in.tile(t0, t0 + n, buf), n, scale == kL2);
  }
  return total;
}

float piece_scale(int scale, double sum, int64_t len) {
  if (scale == kL1) return static_cast<float>(sum / len);
  if (scale == kL2) return static_cast<float>(std::sqrt(sum / len));
  return 1.0f;
}

// Bits (y >= 0) of y[0, 8 * nbytes) into out[0, nbytes).
void pack_bytes(const float* y, int64_t nbytes, uint8_t* out) {
  int64_t b = 0;
#if defined(__AVX512F__)
  for (; b + 2 <= nbytes; b += 2) {
    const uint16_t m = _mm512_cmp_ps_mask(_mm512_loadu_ps(y + 8 * b), _mm512_setzero_ps(), _CMP_GE_OQ);
    std::memcpy(out + b, &m, 2);  // little endian: elements 0-7 in the first byte
  }
#elif defined(__AVX2__)
  for (; b < nbytes; ++b)
    out[b] = static_cast<uint8_t>(
        _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(y + 8 * b), _mm256_setzero_ps(), _CMP_GE_OQ)));
#endif
  for (; b < nbytes; ++b) {
    unsigned v = 0;
    for (int j = 0; j < 8; ++j) v |= unsigned(y[8 * b + j] >= 0.0f) << j;
    out[b] = static_cast<uint8_t>(v);
  }
}

// Bits of elements [i0, i1) inside one byte (y[0] is element i0), OR-ed into that byte: it
// may be shared with a neighbouring piece.
void or_bits(const float* y, int64_t i0, int64_t i1, uint8_t* bits) {
  unsigned v = 0;
  for (int64_t i = i0; i < i1; ++i) v |= unsigned(y[i - i0] >= 0.0f) << (i & 7);
  __atomic_fetch_or(bits + (i0 >> 3), static_cast<uint8_t>(v), __ATOMIC_RELAXED);
}

// Bits of elements [i0, i1), y[0] being element i0.
void pack(const float* y, int64_t i0, int64_t i1, uint8_t* bits) {
  const int64_t a0 = std::min(i1, (i0 + 7) & ~int64_t(7));
  const int64_t a1 = std::max(a0, i1 & ~int64_t(7));
  if (i0 < a0) or_bits(y, i0, a0, bits);
  pack_bytes(y + (a0 - i0), (a1 - a0) / 8, bits + a0 / 8);
  if (a1 < i1) or_bits(y + (a1 - i0), a1, i1, bits);
}

// h updated from C(y) = +-s (times w[i] when kWeighted). Contraction off: a weighted value
// rounds before it is added, as the torch path's mul_ then add_ / sub.
template <bool kWeighted>
__attribute__((optimize("fp-contract=off"))) void update_signs(const float* __restrict y, float* __restrict h,
                                                               int mode, float s, int64_t n,
                                                               const float* __restrict w) {
  if (mode == kMarkov) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const float c = y[i] >= 0.0f ? s : -s;
      h[i] += kWeighted ? c * w[i] : c;
    }
  } else if (mode == kError) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const float c = y[i] >= 0.0f ? s : -s;
      h[i] = y[i] - (kWeighted ? c * w[i] : c);
    }
  }
}

// The update of h with w (nullable): one loop body, compiled with and without the weights.
void update(const float* y, float* h, int mode, float s, int64_t n, const float* w) {
  if (w)
    update_signs<true>(y, h, mode, s, n, w);
  else
    update_signs<false>(y, h, mode, s, n, w);
}

// Signs of [i0, i1) and the update of h there, tile by tile: y is computed once per tile, so
// the bit sent and the sign applied to h always agree.
void encode_range(const Input& in, float* h, int mode, float s, int64_t i0, int64_t i1, uint8_t* bits,
                  const float* w) {
  alignas(64) float buf[kTile];
  for (int64_t t0 = i0; t0 < i1; t0 += kTile) {
    const int64_t t1 = std::min(i1, t0 + kTile);
    const float* y = in.tile(t0, t1, buf);
    pack(y, t0, t1, bits);
    update(y, h + t0, mode, s, t1 - t0, w ? w + t0 : nullptr);
  }
}

// kSigns.v[byte][j]: +1 when bit j of byte is set, else -1 (s times it is exactly +-s).
struct SignTable {
  float v[256][8];
  SignTable() {
    for (int b = 0; b < 256; ++b)
      for (int j = 0; j < 8; ++j) v[b][j] = (b >> j) & 1 ? 1.0f : -1.0f;
  }
};
const SignTable kSigns;

// out[0, 8 * nbytes) = +-s from bits[0, nbytes), times w[i] when w is given (+= when
// accumulate). Contraction off: a weighted value rounds before it is added.
__attribute__((optimize("fp-contract=off"))) void unpack_bytes(const uint8_t* bits, int64_t nbytes, float s,
                                                               const float* __restrict w, float* __restrict out,
                                                               bool accumulate) {
  int64_t b = 0;
#if defined(__AVX512F__)
  const __m512 pos = _mm512_set1_ps(s), neg = _mm512_set1_ps(-s);
  for (; b + 2 <= nbytes; b += 2) {
    uint16_t m;
    std::memcpy(&m, bits + b, 2);
    __m512 c = _mm512_mask_blend_ps(m, neg, pos);
    if (w) c = _mm512_mul_ps(c, _mm512_loadu_ps(w + 8 * b));
    if (accumulate) c = _mm512_add_ps(_mm512_loadu_ps(out + 8 * b), c);
    _mm512_storeu_ps(out + 8 * b, c);
  }
#elif defined(__AVX2__)
  const __m256 pos = _mm256_set1_ps(s), neg = _mm256_set1_ps(-s);
  const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  for (; b < nbytes; ++b) {
    const __m256i set = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(bits[b]), bit), bit);
    __m256 c = _mm256_blendv_ps(neg, pos, _mm256_castsi256_ps(set));
    if (w) c = _mm256_mul_ps(c, _mm256_loadu_ps(w + 8 * b));
    if (accumulate) c = _mm256_add_ps(_mm256_loadu_ps(out + 8 * b), c);
    _mm256_storeu_ps(out + 8 * b, c);
  }
#endif
  for (; b < nbytes; ++b) {
    const float* sign = kSigns.v[bits[b]];
    float* o = out + 8 * b;
    for (int j = 0; j < 8; ++j) {
      const float c = w ? (s * sign[j]) * w[8 * b + j] : s * sign[j];
      o[j] = accumulate ? o[j] + c : c;
    }
  }
}

// Elements [j0, j1) of C one by one into out (+= when accumulate), out[0] and w[0] (nullable)
// being element i0. Contraction off, as in unpack_bytes.
__attribute__((optimize("fp-contract=off"))) void decode_elements(const uint8_t* bits, float s, int64_t i0,
                                                                  int64_t j0, int64_t j1, const float* w, float* out,
                                                                  bool accumulate) {
  for (int64_t i = j0; i < j1; ++i) {
    float c = s * kSigns.v[bits[i >> 3]][i & 7];
    if (w) c *= w[i - i0];
    out[i - i0] = accumulate ? out[i - i0] + c : c;
  }
}

// Elements [i0, i1) of C into out[0, i1 - i0) (+= when accumulate); w (nullable) indexed like out.
void decode_range(const uint8_t* bits, float s, int64_t i0, int64_t i1, float* out, bool accumulate,
                  const float* w) {
  const int64_t a0 = std::min(i1, (i0 + 7) & ~int64_t(7));
  const int64_t a1 = std::max(a0, i1 & ~int64_t(7));
  decode_elements(bits, s, i0, i0, a0, w, out, accumulate);
  unpack_bytes(bits + a0 / 8, (a1 - a0) / 8, s, w ? w + (a0 - i0) : nullptr, out + (a0 - i0), accumulate);
  decode_elements(bits, s, i0, a1, i1, w, out, accumulate);
}

float piece_scale_of(const uint8_t* head, int scale, int64_t index) {
  float s = 1.0f;
  if (scale != kUnit) std::memcpy(&s, head + 4 * index, 4);
  return s;
}

}  // namespace

extern "C" {

// Scale of every piece of y = x + alpha * h into `scales` (one float per piece).
// x: the input as one array, or (x null) as nsegs arrays segs[k] starting at element starts[k].
void tac_sign_scales(const float* x, const float* const* segs, const int64_t* starts, int64_t nsegs, const float* h,
                     float alpha, const int64_t* runs, int64_t nruns, int64_t numel, int scale, float* scales,
                     int threads) {
  const Input in{x ? Source{x} : Source{nullptr, 0, segs, starts, nsegs}, alpha != 0.0f ? h : nullptr, alpha};
  parallel(threads, [&](int t, int n) {
    const int64_t lo = cut(numel, t, n), hi = cut(numel, t + 1, n);
    for_pieces(runs, nruns, lo, hi, [&](const Piece& p) {
      if (p.start >= lo) scales[p.index] = piece_scale(scale, range_sum(in, scale, p.start, p.end), p.end - p.start);
    });
  });
}

// Payload of y = x + alpha * h: the scales into `head` (4 bytes per piece, none for kUnit),
// the signs into `bits` ((numel + 7) / 8 bytes); h updated per `mode`. `given` (nullable)
// replaces the computed scales; `w` (nullable) weights the C(y) that updates h. x as in
// tac_sign_scales.
void tac_sign_encode(const float* x, const float* const* segs, const int64_t* starts, int64_t nsegs, float* h,
                     float alpha, int mode, const int64_t* runs, int64_t nruns, int64_t numel, int scale,
                     const float* given, const float* w, uint8_t* head, uint8_t* bits, int threads) {
  const Input in{x ? Source{x} : Source{nullptr, 0, segs, starts, nsegs}, alpha != 0.0f ? h : nullptr, alpha};
  const bool need_sum = !given && scale != kUnit;
  auto scale_of = [&](const Piece& p, double sum) {
    const float s = given ? given[p.index] : piece_scale(scale, sum, p.end - p.start);
    if (scale != kUnit) std::memcpy(head + 4 * p.index, &s, 4);
    return s;
  };
  std::memset(bits, 0, (numel + 7) / 8);
  parallel(threads, [&](int t, int n) {  // short pieces, each by one thread, in cache
    const int64_t lo = cut(numel, t, n), hi = cut(numel, t + 1, n);
    for_pieces(runs, nruns, lo, hi, [&](const Piece& p) {
      if (p.start < lo || p.end - p.start > kLocal) return;
      const float s = scale_of(p, need_sum ? range_sum(in, scale, p.start, p.end) : 0.0);
      encode_range(in, h, mode, s, p.start, p.end, bits, w);
    });
  });
  int64_t index = 0;
  for (int64_t r = 0; r < nruns; index += runs[3 * r + 1], ++r) {  // long pieces, each by all threads
    const int64_t len = runs[3 * r + 2], segments = (len + kLocal - 1) / kLocal;
    if (segments <= 1) continue;
    for (int64_t k = 0; k < runs[3 * r + 1]; ++k) {
      const Piece p{index + k, runs[3 * r] + k * len, runs[3 * r] + (k + 1) * len};
      auto seg = [&](int64_t j) { return std::min(p.end, p.start + j * kLocal); };
      std::vector<double> partial(segments, 0.0);  // added in order: the same scale for any thread count
      if (need_sum) {
        parallel(threads, [&](int t, int n) {
          for (int64_t j = t; j < segments; j += n) partial[j] = range_sum(in, scale, seg(j), seg(j + 1));
        });
      }
      double sum = 0;
      for (double v : partial) sum += v;
      const float s = scale_of(p, sum);
      parallel(threads, [&](int t, int n) {
        for (int64_t j = t; j < segments; j += n) encode_range(in, h, mode, s, seg(j), seg(j + 1), bits, w);
      });
    }
  }
}

// out = C, or out += C when `accumulate`, from a payload's scales and signs (weighted by w).
void tac_sign_decode(const uint8_t* head, const uint8_t* bits, const int64_t* runs, int64_t nruns, int64_t numel,
                     int scale, const float* w, float* out, int accumulate, int threads) {
  parallel(threads, [&](int t, int n) {
    const int64_t lo = cut(numel, t, n), hi = cut(numel, t + 1, n);
    for_pieces(runs, nruns, lo, hi, [&](const Piece& p) {
      const int64_t i0 = std::max(lo, p.start);
      decode_range(bits, piece_scale_of(head, scale, p.index), i0, std::min(hi, p.end), out + i0, accumulate != 0,
                   w ? w + i0 : nullptr);
    });
  });
}

// The server phase of a two-way chunk, one piece at a time while it is in cache: the mean
// a = (C_0 + ... + C_{n-1}) / n of the n workers' payloads (heads[j], bits[j]), then
// x = a, or with `acc` (Markov's H): acc += a and x = acc; then y = x + alpha * h and its
// payload (into head, bits), h updated per `mode` as in tac_sign_encode. Pieces of at most
// kLocal elements only (LOCAL_MAX in __init__.py); the same bytes and state as decoding,
// adding, dividing and encoding separately. `w` (nullable) weights every decoded value.
void tac_sign_serve(const uint8_t* const* heads, const uint8_t* const* bits_in, int n, const int64_t* runs,
                    int64_t nruns, int64_t numel, int scale, float* acc, float* h, float alpha, int mode,
                    const float* w, uint8_t* head, uint8_t* bits, int threads) {
  std::memset(bits, 0, (numel + 7) / 8);
  parallel(threads, [&](int t, int nt) {
    std::vector<float> y(kLocal);
    const int64_t lo = cut(numel, t, nt), hi = cut(numel, t + 1, nt);
    for_pieces(runs, nruns, lo, hi, [&](const Piece& p) {
      if (p.start < lo) return;
      const int64_t len = p.end - p.start;
      for (int j = 0; j < n; ++j)
        decode_range(bits_in[j], piece_scale_of(heads[j], scale, p.index), p.start, p.end, y.data(), j > 0,
                     w ? w + p.start : nullptr);
      const float count = static_cast<float>(n);
      float* __restrict ys = y.data();
      if (acc) {
        float* __restrict as = acc + p.start;
        for (int64_t i = 0; i < len; ++i) ys[i] = as[i] += ys[i] / count;
      } else {
        for (int64_t i = 0; i < len; ++i) ys[i] /= count;
      }
      if (alpha != 0.0f && h) {
        const float* __restrict hs = h + p.start;
        for (int64_t i = 0; i < len; ++i) ys[i] = ys[i] + alpha * hs[i];
      }
      const Input in{Source{ys, p.start}, nullptr, 0.0f};
      float s = scale != kUnit ? piece_scale(scale, range_sum(in, scale, p.start, p.end), len) : 1.0f;
      if (scale != kUnit) std::memcpy(head + 4 * p.index, &s, 4);
      encode_range(in, h, mode, s, p.start, p.end, bits, w);
    });
  });
}

}  // extern "C"
