// Fused CPU top-k kernel of taciturn.compressors.TopK (loaded by taciturn/kernels/__init__.py).
//
// A segment of `numel` fp32 elements is split into pieces, given as runs (start, count, length)
// of consecutive pieces of equal length. Piece b keeps the k_b entries of y = x + alpha * h of
// largest magnitude; among entries as large as the k_b-th largest, the lowest indices. The
// payload is the one the torch path of TopK writes in its encoding. "fp32": the kept values
// piece after piece, then their int32 indices from the start of the segment in the same order
// (the order within a piece depends on the values only, never on the number of threads).
// "bf16": the kept entries in index order, as one int32 count per 65,536-element window of the
// segment, the values rounded to bf16 (to nearest even, as torch rounds), then the indices'
// low 16 bits.
//
// The selection is a radix select on |y|'s bits (sign cleared: the bits order like the
// magnitudes). A histogram of the top 11 bits finds the bin of the k-th largest; the entries of
// higher bins are kept. When that bin holds few entries they are gathered and the k-th largest
// is found among them; otherwise the next 11 bits, then the last 9, are histogrammed over the
// entries of the bin, which ends with the exact k-th largest magnitude. A long piece keeping
// few entries skips the first histogram: a sample of it gives a bin low enough to hold the top
// k, one pass gathers the entries at or above that bin, and the radix select runs on those
// (on the whole piece after all when the guess held fewer than k or too many).
//
// h is updated with the selection: KEEP: untouched; MARKOV: h += C(y) (the values sent added at
// the kept entries); ERROR: h = y - C(y) (y written over h by the first pass, the kept entries
// then what the encoding rounds off: 0 in fp32).
#include "common.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <utility>
#include <vector>

namespace {

enum Update { kKeep = 0, kMarkov = 1, kError = 2 };

constexpr int64_t kTile = 2048;      // elements per inner tile (its y stays in L1)
constexpr int64_t kLocal = 1 << 16;  // longest piece done by one thread when there are several
constexpr int kLevels = 3;
// Level l histograms bits [kShift[l + 1], kShift[l]) of |y| (bit 31, the sign, is always 0).
constexpr int kShift[kLevels + 1] = {31, 20, 9, 0};
constexpr int kBins = 1 << 11;  // bins of the widest level
constexpr int kCopies = 4;      // histograms counted round robin
constexpr int kBlock = 8;       // entries tested at once when gathering the large ones
constexpr int64_t kStride = 16; // one tile in kStride is sampled
constexpr int kWindowBits = 16; // "bf16" indices count from the start of their window

using tac::for_pieces;
using tac::Piece;

using tac::parallel;

// f(s) for s in [0, count), shared by `count` threads (fewer if OpenMP gives fewer).
template <class F>
void for_each(int count, F f) {
  parallel(count, [&](int t, int n) {
    for (int s = t; s < count; s += n) f(s);
  });
}

// Start of segment s of a piece cut in `segments`.
int64_t edge(const Piece& p, int s, int segments) { return p.start + (p.end - p.start) * s / segments; }

// y rounded to bf16 (to nearest even; NaN to the quiet NaN torch writes), as its 16 bits.
uint16_t to_bf16(float y) {
  uint32_t bits;
  std::memcpy(&bits, &y, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  return static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

float from_bf16(uint16_t v) {
  const uint32_t bits = uint32_t(v) << 16;
  float y;
  std::memcpy(&y, &bits, 4);
  return y;
}

// The "bf16" index windows of a segment of `numel` elements.
int64_t index_windows(int64_t numel) { return (numel + (int64_t(1) << kWindowBits) - 1) >> kWindowBits; }

uint32_t magnitude(float y) {
  uint32_t bits;
  std::memcpy(&bits, &y, 4);
  return bits & 0x7fffffffu;
}

// y = x + alpha * h (h null: y = x).
struct Input {
  const float* x;
  const float* h;
  float alpha;

  // y[i0, i1) into out[0, i1 - i0); out may be h + i0 itself.
  void fill(int64_t i0, int64_t i1, float* out) const {
    if (h) {
      for (int64_t i = i0; i < i1; ++i) out[i - i0] = x[i] + alpha * h[i];
    } else {
      std::memcpy(out, x + i0, 4 * (i1 - i0));
    }
  }
};

// f(y, t0, t1) for the tiles [t0, t1) of [i0, i1), y[0] being element t0: x itself, or y
// computed into a buffer, or into store[t0, t1) when `store` is given.
template <class F>
void for_tiles(const Input& in, float* store, int64_t i0, int64_t i1, F f) {
  alignas(64) float buf[kTile];
  for (int64_t t0 = i0; t0 < i1; t0 += kTile) {
    const int64_t t1 = std::min(i1, t0 + kTile);
    const float* y = in.x + t0;
    if (store || in.h) {
      float* out = store ? store + t0 : buf;
      in.fill(t0, t1, out);
      y = out;
    }
    f(y, t0, t1);
  }
}

// f(v, i) for the entries v = y[i - i0] of [i0, i0 + n) whose bits above `shift` are at least
// `prefix`, in order. Blocks of kBlock entries are skipped on one vectorised test when none is.
template <class F>
void for_large(const float* y, int64_t i0, int64_t n, uint32_t prefix, int shift, F f) {
  auto visit = [&](int64_t i) {
    if ((magnitude(y[i]) >> shift) >= prefix) f(y[i], i0 + i);
  };
  int64_t i = 0;
  for (; i + kBlock <= n; i += kBlock) {
    uint32_t largest = 0;
#pragma omp simd reduction(max : largest)
    for (int j = 0; j < kBlock; ++j) largest = std::max(largest, magnitude(y[i + j]));
    if ((largest >> shift) < prefix) continue;
    for (int j = 0; j < kBlock; ++j) visit(i + j);
  }
  for (; i < n; ++i) visit(i);
}

// copies[c][bin] += entries y[i] (i % kCopies == c) whose bits [lo, hi) are `bin` and whose
// higher bits are `prefix` (kCopies histograms: repeated bins do not wait on each other).
// Level 0 (`kAll`) counts every entry.
template <bool kAll>
void count(const float* y, int64_t n, int hi, int lo, uint32_t prefix, uint32_t* copies) {
  const uint32_t mask = (1u << (hi - lo)) - 1;
  auto add = [&](uint32_t* hist, float v) {
    const uint32_t key = magnitude(v);
    if (kAll || (key >> hi) == prefix) ++hist[(key >> lo) & mask];
  };
  int64_t i = 0;
  for (; i + kCopies <= n; i += kCopies)
    for (int c = 0; c < kCopies; ++c) add(copies + c * kBins, y[i + c]);
  for (; i < n; ++i) add(copies, y[i]);
}

// Histogram (kCopies copies, see `count`; `fold` adds them up) of the bits of level `level` of
// the entries of [i0, i1) whose higher bits are `prefix`, added to `copies`. y is written into
// `store` if given.
void histogram(const Input& in, float* store, int level, uint32_t prefix, int64_t i0, int64_t i1, uint32_t* copies) {
  for_tiles(in, store, i0, i1, [&](const float* y, int64_t t0, int64_t t1) {
    (level == 0 ? count<true> : count<false>)(y, t1 - t0, kShift[level], kShift[level + 1], prefix, copies);
  });
}

// The kCopies copies of a histogram added up into the first.
void fold(uint32_t* copies) {
  for (int c = 1; c < kCopies; ++c)
    for (int b = 0; b < kBins; ++b) copies[b] += copies[c * kBins + b];
}

// The entries of [i0, i1) whose bits above `shift` exceed `prefix` go to vals/idx in order;
// those equal to it go to cvals/cidx, the r-th of them (from `rank`) at r when r < `limit`.
void collect(const Input& in, uint32_t prefix, int shift, int64_t i0, int64_t i1, float* vals, int32_t* idx,
             float* cvals, int32_t* cidx, int64_t rank, int64_t limit) {
  for_tiles(in, nullptr, i0, i1, [&](const float* y, int64_t t0, int64_t t1) {
    for_large(y, t0, t1 - t0, prefix, shift, [&](float v, int64_t i) {
      if ((magnitude(v) >> shift) > prefix) {
        *vals++ = v;
        *idx++ = static_cast<int32_t>(i);
      } else if (rank < limit) {
        cvals[rank] = v;
        cidx[rank++] = static_cast<int32_t>(i);
      }
    });
  });
}

// The `need` largest of m candidates in index order (the lowest indices among the ties) into
// vals/idx, in that order.
void pick(const float* cvals, const int32_t* cidx, int64_t m, int64_t need, float* vals, int32_t* idx) {
  std::vector<uint32_t> keys(m);
  for (int64_t j = 0; j < m; ++j) keys[j] = magnitude(cvals[j]);
  std::nth_element(keys.begin(), keys.begin() + (need - 1), keys.end(), std::greater<uint32_t>());
  const uint32_t kth = keys[need - 1];
  int64_t ties = need;
  for (int64_t j = 0; j < m; ++j) ties -= magnitude(cvals[j]) > kth;
  for (int64_t j = 0, o = 0; o < need; ++j) {
    const uint32_t key = magnitude(cvals[j]);
    if (key > kth || (key == kth && ties-- > 0)) {
      vals[o] = cvals[j];
      idx[o++] = cidx[j];
    }
  }
}

// The top k (0 < k <= length) of piece p into vals/idx by radix select, the passes shared by
// `segments` threads (one segment each); y is written into `store` by the first pass if given.
// They come as the entries above the bin of the k-th largest in index order, then the ones
// picked from that bin in index order; returns how many come first.
int64_t radix_select(Input in, float* store, const Piece& p, int64_t k, float* vals, int32_t* idx, int segments) {
  auto seg = [&](int s) { return edge(p, s, segments); };
  if (k == p.end - p.start) {  // every entry, in index order
    for_each(segments, [&](int s) {
      for_tiles(in, store, seg(s), seg(s + 1), [&](const float* y, int64_t t0, int64_t t1) {
        std::memcpy(vals + (t0 - p.start), y, 4 * (t1 - t0));
        for (int64_t i = t0; i < t1; ++i) idx[i - p.start] = static_cast<int32_t>(i);
      });
    });
    return k;
  }
  const int64_t few = std::max(kTile, (p.end - p.start) / 32);  // a bin this small is gathered
  std::vector<uint32_t> copies(size_t(segments) * kCopies * kBins);
  auto hist = [&](int s) { return &copies[size_t(s) * kCopies * kBins]; };  // folded: the first copy
  auto total = [&](uint32_t b) {
    int64_t sum = 0;
    for (int s = 0; s < segments; ++s) sum += hist(s)[b];
    return sum;
  };
  std::vector<int64_t> above(segments, 0);  // entries of each segment in bins above the k-th
  int64_t need = k, inside = 0;
  uint32_t prefix = 0, bin = 0;
  int level = 0;
  while (true) {
    if (level > 0) std::fill(copies.begin(), copies.end(), 0u);  // zero from the start at level 0
    for_each(segments, [&](int s) {
      histogram(in, store, level, prefix, seg(s), seg(s + 1), hist(s));
      fold(hist(s));
    });
    if (store) {  // y is there now
      in = Input{store, nullptr, 0.0f};
      store = nullptr;
    }
    const int width = kShift[level] - kShift[level + 1];
    for (bin = (1u << width) - 1;; --bin) {
      const int64_t in_bin = total(bin);
      if (need <= in_bin) break;
      need -= in_bin;
    }
    for (int s = 0; s < segments; ++s)
      for (uint32_t b = bin + 1; b < (1u << width); ++b) above[s] += hist(s)[b];
    prefix = (prefix << width) | bin;
    inside = total(bin);
    if (++level == kLevels || inside <= few) break;
  }
  // Where every segment's entries above the bin and inside it go.
  std::vector<int64_t> above_at(segments + 1, 0), inside_at(segments + 1, 0);
  for (int s = 0; s < segments; ++s) {
    above_at[s + 1] = above_at[s] + above[s];
    inside_at[s + 1] = inside_at[s] + hist(s)[bin];
  }
  const int64_t kept = above_at[segments];
  // At the last level the bin holds the ties of the k-th largest: the first `need` are kept.
  const bool exact = level == kLevels;
  std::vector<float> cvals(exact ? 0 : inside);
  std::vector<int32_t> cidx(exact ? 0 : inside);
  float* cv = exact ? vals + kept : cvals.data();
  int32_t* ci = exact ? idx + kept : cidx.data();
  for_each(segments, [&](int s) {
    collect(in, prefix, kShift[level], seg(s), seg(s + 1), vals + above_at[s], idx + above_at[s], cv, ci,
            inside_at[s], exact ? need : inside);
  });
  if (!exact) pick(cv, ci, inside, need, vals + kept, idx + kept);
  return kept;
}

// Entries whose bits of |y| above `shift` are at least `prefix`.
struct Bound {
  uint32_t prefix;
  int shift;
};

// A bound above which, judging by one tile in kStride of piece p, comfortably more than k
// entries lie: the level-0 bin where they start, narrowed to a level-1 bin inside it (so the
// entries above it are few more than k: a level-0 bin spans a quarter of an octave).
Bound sample_bound(const Input& in, const Piece& p, int64_t k) {
  std::vector<uint32_t> copies(kCopies * kBins);
  auto sample = [&](int level, uint32_t prefix) {  // the sample's histogram of a level, folded
    std::fill(copies.begin(), copies.end(), 0u);
    int64_t seen = 0;
    for (int64_t t0 = p.start; t0 < p.end; t0 += kStride * kTile) {
      const int64_t t1 = std::min(p.end, t0 + kTile);
      histogram(in, nullptr, level, prefix, t0, t1, copies.data());
      seen += t1 - t0;
    }
    fold(copies.data());
    return seen;
  };
  const double expected = double(k) * sample(0, 0) / (p.end - p.start);
  const double enough = expected + 4 * std::sqrt(expected) + 16;
  uint32_t bin = kBins - 1;
  int64_t sum = copies[bin];
  while (bin > 0 && sum < enough) sum += copies[--bin];
  if (sum < enough) return {0, kShift[1]};  // every entry
  const double rest = enough - double(sum - copies[bin]);  // needed from inside the bin
  const int width = kShift[1] - kShift[2];
  sample(1, bin);
  uint32_t sub = (1u << width) - 1;
  int64_t inside = copies[sub];
  while (sub > 0 && inside < rest) inside += copies[--sub];
  return {(bin << width) | sub, kShift[2]};
}

// Entries at or above a bound, in index order (arrays grown as needed, never initialised).
struct Found {
  std::unique_ptr<float[]> vals;
  std::unique_ptr<int32_t[]> idx;
  int64_t size = 0;   // room for
  int64_t count = 0;  // entries found

  void reserve(int64_t n) {
    if (n <= size) return;
    std::unique_ptr<float[]> v(new float[n]);
    std::unique_ptr<int32_t[]> i(new int32_t[n]);
    std::copy(vals.get(), vals.get() + count, v.get());
    std::copy(idx.get(), idx.get() + count, i.get());
    vals = std::move(v);
    idx = std::move(i);
    size = n;
  }
};

// The entries of [i0, i1) at or above `bound` into `found` (room for `expect` made first),
// until more than `cap` are found; y written into `store` if given (all of it). A block of
// kBlock entries with none that large is skipped on one vectorised test; the others are
// written without branches, the count advanced by the ones at or above the bound.
void gather(const Input& in, float* store, Bound bound, int64_t i0, int64_t i1, int64_t cap, int64_t expect,
            Found& found) {
  found.reserve(expect + kBlock);
  // the entries y[i, i + n) (n <= kBlock), written, the count advanced by the large ones
  auto keep = [&](const float* y, int64_t t0, int64_t i, int64_t n) {
    if (found.count + kBlock > found.size) found.reserve(2 * found.size);
    float* vals = found.vals.get();
    int32_t* idx = found.idx.get();
    int64_t c = found.count;
    for (int64_t j = i; j < i + n; ++j) {
      vals[c] = y[j];
      idx[c] = static_cast<int32_t>(t0 + j);
      c += (magnitude(y[j]) >> bound.shift) >= bound.prefix;
    }
    found.count = c;
  };
  for_tiles(in, store, i0, i1, [&](const float* y, int64_t t0, int64_t t1) {
    const int64_t n = t1 - t0;
    int64_t i = 0;
    for (; i + kBlock <= n && found.count <= cap; i += kBlock) {
      uint32_t largest = 0;
#pragma omp simd reduction(max : largest)
      for (int j = 0; j < kBlock; ++j) largest = std::max(largest, magnitude(y[i + j]));
      if ((largest >> bound.shift) >= bound.prefix) keep(y, t0, i, kBlock);
    }
    if (i < n && found.count <= cap) keep(y, t0, i, n - i);
  });
}

// The top k of piece p as `radix_select` gives them (and its count of the first ones), from the
// entries at or above a bound guessed by `sample_bound`, gathered in one pass (y written into
// `store` if given). -1, vals/idx untouched, when fewer than k entries or more than a sixteenth
// of the piece lay above it.
int64_t sampled_select(const Input& in, float* store, const Piece& p, int64_t k, float* vals, int32_t* idx,
                       int segments) {
  const int64_t cap = (p.end - p.start) / 16;
  const Bound bound = sample_bound(in, p, k);
  const int64_t expect = (k + k / 16) / segments;  // the bound leaves a few percent more than k
  std::vector<Found> found(segments);
  for_each(segments, [&](int s) {
    gather(in, store, bound, edge(p, s, segments), edge(p, s + 1, segments), cap, expect, found[s]);
  });
  int64_t m = 0;
  for (const Found& f : found) m += f.count;
  if (m < k || m > cap) return -1;
  Found all;  // the segments' entries one after the other
  if (segments == 1) {
    all = std::move(found[0]);
  } else {
    all.reserve(m);
    for (const Found& f : found) {
      std::copy(f.vals.get(), f.vals.get() + f.count, all.vals.get() + all.count);
      std::copy(f.idx.get(), f.idx.get() + f.count, all.idx.get() + all.count);
      all.count += f.count;
    }
  }
  const int64_t first =
      radix_select(Input{all.vals.get(), nullptr, 0.0f}, nullptr, Piece{0, 0, m}, k, vals, idx, 1);
  for (int64_t j = 0; j < k; ++j) idx[j] = all.idx[idx[j]];
  return first;
}

// h at the kept entries, y there being vals and the value sent y rounded to bf16 when `bf16`:
// MARKOV h += the value sent, ERROR h = y - the value sent (h holds y there already).
void update(float* h, int mode, const float* vals, const int32_t* idx, int64_t k, bool bf16) {
  auto sent = [&](float v) { return bf16 ? from_bf16(to_bf16(v)) : v; };
  if (mode == kMarkov) {
    for (int64_t j = 0; j < k; ++j) h[idx[j]] += sent(vals[j]);
  } else if (mode == kError) {
    for (int64_t j = 0; j < k; ++j) h[idx[j]] = vals[j] - sent(vals[j]);
  }
}

// The top k of piece p into vals/idx as two runs in index order, and h updated per `mode` (the
// values sent rounded to bf16 when `bf16`), the passes over the piece shared by `segments`
// threads; returns the length of the first run.
int64_t select_piece(Input in, float* h, int mode, const Piece& p, int64_t k, float* vals, int32_t* idx,
                     int segments, bool bf16) {
  if (k <= 0) return 0;
  float* store = mode == kError ? h : nullptr;
  int64_t first = -1;
  if (p.end - p.start > kLocal && 32 * k <= p.end - p.start) {
    first = sampled_select(in, store, p, k, vals, idx, segments);
    if (store) {  // y is in h now
      in = Input{h, nullptr, 0.0f};
      store = nullptr;
    }
  }
  if (first < 0) first = radix_select(in, store, p, k, vals, idx, segments);
  update(h, mode, vals, idx, k, bf16);
  return first;
}

// The "bf16" payload of a segment of `numel` elements from the entries vals/idx of its pieces:
// piece b's at [offset[b], offset[b + 1]) as two runs in index order, the first `first[b]` long,
// merged on the way into the payload's index order.
void write_bf16(const float* vals, const int32_t* idx, const std::vector<int64_t>& offset,
                const std::vector<int64_t>& first, int64_t numel, uint8_t* payload) {
  const int64_t windows = index_windows(numel);
  const int64_t total = offset.back();
  int32_t* per_window = reinterpret_cast<int32_t*>(payload);
  uint16_t* values = reinterpret_cast<uint16_t*>(payload + 4 * windows);
  uint16_t* low = values + total;
  std::fill(per_window, per_window + windows, 0);
  int64_t o = 0;
  auto put = [&](int64_t j) {
    ++per_window[idx[j] >> kWindowBits];
    values[o] = to_bf16(vals[j]);
    low[o++] = static_cast<uint16_t>(idx[j] & ((1 << kWindowBits) - 1));
  };
  for (size_t b = 0; b + 1 < offset.size(); ++b) {
    int64_t a = offset[b], c = offset[b] + first[b];
    const int64_t a_end = c, c_end = offset[b + 1];
    while (a < a_end && c < c_end) put(idx[a] < idx[c] ? a++ : c++);
    while (a < a_end) put(a++);
    while (c < c_end) put(c++);
  }
}

}  // namespace

extern "C" {

// Top-k payload of y = x + alpha * h: counts[b] kept entries of piece b (total = sum of counts),
// fp32 (`bf16` 0): values into payload[0, 4 * total) and indices into payload[4 * total, 8 * total);
// `bf16` 1: the "bf16" payload. h updated per `mode`.
void tac_topk_encode(const float* x, float* h, float alpha, int mode, const int64_t* runs, int64_t nruns,
                     int64_t numel, const int64_t* counts, uint8_t* payload, int threads, int bf16) {
  int64_t pieces = 0;
  for (int64_t r = 0; r < nruns; ++r) pieces += runs[3 * r + 1];
  std::vector<int64_t> offset(pieces + 1, 0);
  for (int64_t b = 0; b < pieces; ++b) offset[b + 1] = offset[b] + counts[b];
  const int64_t total = offset[pieces];
  std::vector<float> bf16_vals(bf16 ? total : 0);  // the "bf16" entries before they are encoded
  std::vector<int32_t> bf16_idx(bf16 ? total : 0);
  float* vals = bf16 ? bf16_vals.data() : reinterpret_cast<float*>(payload);
  int32_t* idx = bf16 ? bf16_idx.data() : reinterpret_cast<int32_t*>(payload + 4 * total);
  const Input in{x, alpha != 0.0f ? h : nullptr, alpha};
  std::vector<int64_t> first(pieces, 0);
  auto run = [&](const Piece& p, int segments) {
    first[p.index] = select_piece(in, h, mode, p, counts[p.index], vals + offset[p.index], idx + offset[p.index],
                                  segments, bf16);
  };
  auto local = [&](const Piece& p) { return threads <= 1 || p.end - p.start <= kLocal; };
  parallel(threads, [&](int t, int n) {  // short pieces, each by one thread
    const int64_t lo = numel * t / n, hi = numel * (t + 1) / n;
    for_pieces(runs, nruns, lo, hi, [&](const Piece& p) {
      if (p.start >= lo && local(p)) run(p, 1);
    });
  });
  for_pieces(runs, nruns, 0, numel, [&](const Piece& p) {  // long pieces, each by all threads
    if (!local(p)) run(p, threads);
  });
  if (bf16) write_bf16(vals, idx, offset, first, numel, payload);
}

// The `total` entries of a top-k payload (`bf16`: the "bf16" layout, else fp32 values then int32
// indices) of a segment of `numel` elements, written into out (zeroed first) or, `accumulate`,
// added to it. Entries with an index outside the segment are skipped (never from encode).
void tac_topk_decode(const uint8_t* payload, int64_t total, int64_t numel, int bf16, float* out, int accumulate,
                     int threads) {
  if (!accumulate) {
    parallel(threads, [&](int t, int n) {
      const int64_t lo = numel * t / n, hi = numel * (t + 1) / n;
      std::memset(out + lo, 0, 4 * (hi - lo));
    });
  }
  auto put = [&](int64_t i, float v) {
    if (i >= 0 && i < numel) out[i] = accumulate ? out[i] + v : v;
  };
  if (!bf16) {
    const float* vals = reinterpret_cast<const float*>(payload);
    const int32_t* idx = reinterpret_cast<const int32_t*>(payload + 4 * total);
    for (int64_t j = 0; j < total; ++j) put(idx[j], vals[j]);
    return;
  }
  const int64_t windows = index_windows(numel);
  const int32_t* per_window = reinterpret_cast<const int32_t*>(payload);
  const uint16_t* values = reinterpret_cast<const uint16_t*>(payload + 4 * windows);
  const uint16_t* low = values + total;
  int64_t j = 0;
  for (int64_t w = 0; w < windows; ++w) {
    const int64_t base = w << kWindowBits;
    for (const int64_t end = std::min(total, j + per_window[w]); j < end; ++j)
      put(base + low[j], from_bf16(values[j]));
  }
}

}  // extern "C"
