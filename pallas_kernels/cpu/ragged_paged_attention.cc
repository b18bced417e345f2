// Ragged paged attention for the CPU, called from a jitted step through the XLA FFI.
//
// The contract is pallas_kernels/reference.py's ragged_paged_attention_reference (docs/design.md,
// section 3): q [T, Hq, D]; kv_pages [num_pages, page_size, 2 * Hkv, D] with K of head h at 2h and
// V at 2h + 1 (f32, bf16, f16, or int8 / float8_e4m3fn times kv_scales [num_pages, page_size,
// 2 * Hkv]); kv_lens i32[S]; page_indices i32[S, P]; cu_q_lens i32[S + 1]; num_seqs i32[1].
// Everything is computed in f32, as the reference does.
//
// Why it exists: XLA's CPU backend compiles the reference to a gather of K/V pages into a buffer
// and small batched dots over it, which read the pages at a fifth of copy bandwidth. Here each
// work item (a sequence's block of query rows, for some of its kv heads) walks its pages once,
// a page at a time: converted into a small f32 tile while in the cache, scored, and folded into
// an online softmax. Items run on XLA's intra-op thread pool (for_each_item.h).
//
// Heads of 16 to 256 dims in steps of 16 (where the compiler has __builtin_shufflevector) take
// 16 keys at a time in vectors of 16 floats, kv head by kv head: a head's 16 keys are
// transposed once (lane t: key t), then blocks of that head's queries (its rows times the
// group) score them with one FMA per dim and query, run the online softmax on each query's
// vector of 16 scores, and add the 16 values, each value vector loaded once per block. A lone
// query (a decode without grouped queries) scores the keys as 16 lanes of partial sums each,
// summed by a transposing tree (SumLanes) instead. Against the form before (every query alone,
// scores, softmax and values each a pass over all queries), a 512-token prompt's attention runs
// 1.8x as fast, 2.1x with four query heads a kv head, and a decode of 64 sequences 1.2x
// (docs/perf.md). Builds without AVX-512 keep that form (each query alone), where GCC's code
// for the wide shuffles made the new one slower; with AVX (8-float registers) its key scores
// and value sums run in registers of 8, the softmax step in two of them (a decode 1.5-2.5x, a
// prompt 2.8-5x as fast as in 16-float vectors there). Other head sizes take a plain loop per
// query.
//
// Defensive reads: a page-table entry outside [0, num_pages) reads page 0, context lengths are
// cut to the page table, and rows outside cu_q_lens stay zero, so no input reads or writes
// outside its buffers.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "for_each_item.h"
#include "vec16.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kRowBlock = 16;  // query rows of one sequence per work item
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

float Bf16ToF32(uint16_t bits) {
  uint32_t wide = uint32_t(bits) << 16;
  float value;
  std::memcpy(&value, &wide, sizeof value);
  return value;
}

uint16_t F32ToBf16(float value) {  // round to nearest even; NaN stays NaN
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return uint16_t((bits >> 16) | 0x40u);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return uint16_t(bits >> 16);
}

struct Float8Table {  // float8_e4m3fn: bias 7, no infinities, 0x7f and 0xff are NaN
  float value[256];
  Float8Table() {
    for (int bits = 0; bits < 256; ++bits) {
      int exponent = (bits >> 3) & 0xf, mantissa = bits & 0x7;
      float magnitude = exponent == 0 ? std::ldexp(float(mantissa), -9)
                                      : std::ldexp(1.0f + mantissa / 8.0f, exponent - 7);
      if (exponent == 0xf && mantissa == 0x7) magnitude = std::nanf("");
      value[bits] = bits & 0x80 ? -magnitude : magnitude;
    }
  }
};
const Float8Table kFloat8;

float LoadAsF32(const void* base, int64_t index, ffi::DataType type) {
  switch (type) {
    case ffi::DataType::F32: return static_cast<const float*>(base)[index];
    case ffi::DataType::BF16: return Bf16ToF32(static_cast<const uint16_t*>(base)[index]);
    case ffi::DataType::F16: return float(static_cast<const _Float16*>(base)[index]);
    case ffi::DataType::S8: return float(static_cast<const int8_t*>(base)[index]);
    default: return kFloat8.value[static_cast<const uint8_t*>(base)[index]];
  }
}

// dst[i] = src[offset + i] as f32, times scale, for i < n.
void LoadRow(const void* src, int64_t offset, int64_t n, ffi::DataType type, float scale,
             float* dst) {
  switch (type) {
    case ffi::DataType::F32: {
      const float* from = static_cast<const float*>(src) + offset;
      for (int64_t i = 0; i < n; ++i) dst[i] = from[i];
      return;
    }
    case ffi::DataType::BF16: {
      const uint16_t* from = static_cast<const uint16_t*>(src) + offset;
      for (int64_t i = 0; i < n; ++i) dst[i] = Bf16ToF32(from[i]);
      return;
    }
    case ffi::DataType::S8: {
      const int8_t* from = static_cast<const int8_t*>(src) + offset;
      for (int64_t i = 0; i < n; ++i) dst[i] = float(from[i]) * scale;
      return;
    }
    default:
      for (int64_t i = 0; i < n; ++i) dst[i] = LoadAsF32(src, offset + i, type) * scale;
  }
}

void StoreRow(const float* src, int64_t n, ffi::DataType type, void* dst, int64_t offset) {
  for (int64_t i = 0; i < n; ++i) {
    switch (type) {
      case ffi::DataType::F32: static_cast<float*>(dst)[offset + i] = src[i]; break;
      case ffi::DataType::BF16:
        static_cast<uint16_t*>(dst)[offset + i] = F32ToBf16(src[i]);
        break;
      default: static_cast<_Float16*>(dst)[offset + i] = _Float16(src[i]);
    }
  }
}

// e^x for x <= 0 to within 2 ulp (Cephes' expf: x = n ln 2 + r, a degree-5 polynomial in r,
// times 2^n), branch-free so that a loop of them vectorizes (libm's expf does not).
// ExpOfRest: e^r for r = x - n ln 2 (T a float or a Vec).
template <typename T>
inline T ExpOfRest(T x, T n) {
  x -= n * 0.693359375f;
  x -= n * -2.12194440e-4f;
  const T z = x * x;
  T y = x * 1.9875691500e-4f + 1.3981999507e-3f;
  y = y * x + 8.3334519073e-3f;
  y = y * x + 4.1665795894e-2f;
  y = y * x + 1.6666665459e-1f;
  y = y * x + 5.0000001201e-1f;
  return y * z + x + 1.0f;
}

inline float ExpNonPositive(float x) {
  x = std::max(x, -87.0f);                      // e^-87 ~ 1.6e-38: still a normal float
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float y = ExpOfRest(x, n);
  const int32_t exponent_bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &exponent_bits, sizeof scale);
  return y * scale;
}

// A query's online softmax meets a chunk whose largest score is chunk_max: where that is above
// the running maximum, the running sum and the output acc[d] are rescaled to it.
inline void RaiseMax(float chunk_max, float& running_max, float& running_sum, float* acc,
                     int64_t d) {
  if (chunk_max <= running_max) return;
  const float rescale = std::exp(running_max - chunk_max);
  running_sum *= rescale;
  for (int64_t i = 0; i < d; ++i) acc[i] *= rescale;
  running_max = chunk_max;
}

float Dot(const float* a, const float* b, int64_t n) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
#define EMBER_VECTOR_PAGES 1
using ember_cpu::LoadVec;
using ember_cpu::Vec;

// Lane t of the result is the sum of x[t]'s 16 lanes: four rounds of pairing halves.
inline Vec SumLanes(const Vec (&x)[16]) {
  Vec a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i) {   // lanes 0-7: token 2i, 8-15: token 2i + 1
    a[i] = __builtin_shufflevector(x[2 * i], x[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18,
                                   19, 20, 21, 22, 23) +
           __builtin_shufflevector(x[2 * i], x[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25,
                                   26, 27, 28, 29, 30, 31);
  }
  for (int i = 0; i < 4; ++i) {   // four lanes per token, tokens 4i .. 4i + 3
    b[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18,
                                   19, 24, 25, 26, 27) +
           __builtin_shufflevector(a[2 * i], a[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21,
                                   22, 23, 28, 29, 30, 31);
  }
  for (int i = 0; i < 2; ++i) {   // two lanes per token, tokens 8i .. 8i + 7
    c[i] = __builtin_shufflevector(b[2 * i], b[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20,
                                   21, 24, 25, 28, 29) +
           __builtin_shufflevector(b[2 * i], b[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19,
                                   22, 23, 26, 27, 30, 31);
  }
  return __builtin_shufflevector(c[0], c[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26,
                                 28, 30) +
         __builtin_shufflevector(c[0], c[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27,
                                 29, 31);
}

using ember_cpu::kLanes;
using ember_cpu::Lanes;
using ember_cpu::LoadLanes;

#if !defined(__AVX512F__) && defined(__AVX__)
// Lane t of the result is the sum of x[t]'s 8 lanes: three rounds of pairing halves.
inline Lanes SumLanes(const Lanes (&x)[8]) {
  Lanes a[4], b[2];
  for (int i = 0; i < 4; ++i) {   // lanes 0-3: token 2i, 4-7: token 2i + 1
    a[i] = __builtin_shufflevector(x[2 * i], x[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11) +
           __builtin_shufflevector(x[2 * i], x[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15);
  }
  for (int i = 0; i < 2; ++i) {   // two lanes each of tokens 4i, 4i + 2, 4i + 1, 4i + 3
    b[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 1, 8, 9, 4, 5, 12, 13) +
           __builtin_shufflevector(a[2 * i], a[2 * i + 1], 2, 3, 10, 11, 6, 7, 14, 15);
  }
  return __builtin_shufflevector(b[0], b[1], 0, 4, 2, 6, 8, 12, 10, 14) +
         __builtin_shufflevector(b[0], b[1], 1, 5, 3, 7, 9, 13, 11, 15);
}
#endif

// Lane t: query . keys[t * stride] for t < count <= 16 (else 0), for a head of 16 * C dims.
// With 16-float registers each key's partial sums are one vector, with 8-float ones (AVX)
// the keys go 8 at a time, their partial sums in 8 registers (a 16-float vector is two
// registers there, and 16 of them would not fit the 16 registers).
template <int C>
Vec ScoreKeys(const float* query, const float* keys, int64_t stride, int64_t count) {
#if !defined(__AVX512F__) && defined(__AVX__)
  constexpr int kParts = 16 * C / kLanes;
  float out[16];
  for (int half = 0; half < 2; ++half) {
    Lanes part[kLanes];
#pragma GCC unroll 8
    for (int t = 0; t < kLanes; ++t) {
      part[t] = Lanes{};
      if (kLanes * half + t < count) {
        const float* key = keys + (kLanes * half + t) * stride;
        for (int c = 0; c < kParts; ++c) {
          part[t] += LoadLanes(query + kLanes * c) * LoadLanes(key + kLanes * c);
        }
      }
    }
    const Lanes sums = SumLanes(part);
    std::memcpy(out + kLanes * half, &sums, sizeof sums);
  }
  return LoadVec(out);
#else
  Vec q[C];
  for (int c = 0; c < C; ++c) q[c] = LoadVec(query + 16 * c);
  Vec part[16];
#pragma GCC unroll 16   // the 16 keys' partial sums in registers, their FMAs interleaved
  for (int t = 0; t < 16; ++t) {
    part[t] = Vec{};
    if (t < count) {
      const float* key = keys + t * stride;
      for (int c = 0; c < C; ++c) part[t] += q[c] * LoadVec(key + 16 * c);
    }
  }
  return SumLanes(part);
#endif
}

#ifndef __AVX512F__
// The largest divisor of n that is at most 8: registers of sums AddValues keeps at a time.
constexpr int SumsAtATime(int n) {
  for (int k = 8; k > 1; --k) {
    if (n % k == 0) return k;
  }
  return 1;
}

// acc += sum of weights[t] * values[t * stride] over t < count <= 16, skipping zero weights:
// the head's dims a few registers at a time (all of them would not fit the registers).
template <int C>
void AddValues(Vec weights, const float* values, int64_t stride, int64_t count, float* acc) {
  constexpr int kParts = 16 * C / kLanes, kStep = SumsAtATime(kParts);
  float w[16];
  std::memcpy(w, &weights, sizeof w);
  for (int c0 = 0; c0 < kParts; c0 += kStep) {
    Lanes sum[kStep];
    for (int c = 0; c < kStep; ++c) sum[c] = LoadLanes(acc + kLanes * (c0 + c));
    for (int64_t t = 0; t < count; ++t) {
      const float weight = w[t];
      if (weight == 0.0f) continue;   // not visible (or underflowed: adds nothing)
      const float* value = values + t * stride + kLanes * c0;
      for (int c = 0; c < kStep; ++c) sum[c] += weight * LoadLanes(value + kLanes * c);
    }
    for (int c = 0; c < kStep; ++c) std::memcpy(acc + kLanes * (c0 + c), &sum[c], sizeof sum[c]);
  }
}
#endif

#ifdef __AVX512F__
#define EMBER_HEADWISE_PAGES 1
// The 16 keys of a kv head are transposed once (a vector per dim, lane t: key t), and the
// queries of that head score them a block at a time: one FMA per dim and query, each query's 16
// scores landing in one vector; then the block adds the 16 values, each value vector loaded
// once for all its queries. A block's sums stay in registers: kBlockSums of AVX-512's 32.
// Without AVX-512 (a vector of 16 floats in two or four registers) GCC's code for these
// shuffles and blocks was slower than the per-query form, which such builds keep.
constexpr int kBlockSums = 24;

template <int C>
constexpr int QueryBlock() { return std::max(1, std::min(6, kBlockSums / C)); }

// Swaps the off-diagonal S x S blocks of every 2S x 2S block of the 16 x 16 matrix x (rows
// x[i], columns its lanes): after S = 8, 4, 2 and 1, x is transposed.
#define EMBER_FROM_ROW(S, l) (((l) & (S)) ? 16 + (l) - (S) : (l))
#define EMBER_FROM_NEXT(S, l) (((l) & (S)) ? 16 + (l) : (l) + (S))
#define EMBER_LANES(F, S) F(S, 0), F(S, 1), F(S, 2), F(S, 3), F(S, 4), F(S, 5), F(S, 6), \
    F(S, 7), F(S, 8), F(S, 9), F(S, 10), F(S, 11), F(S, 12), F(S, 13), F(S, 14), F(S, 15)
template <int S>
inline void SwapBlocks(Vec (&x)[16]) {
  for (int i = 0; i < 16; ++i) {
    if (i & S) continue;
    const Vec a = x[i], b = x[i + S];
    x[i] = __builtin_shufflevector(a, b, EMBER_LANES(EMBER_FROM_ROW, S));
    x[i + S] = __builtin_shufflevector(a, b, EMBER_LANES(EMBER_FROM_NEXT, S));
  }
}
#undef EMBER_LANES
#undef EMBER_FROM_NEXT
#undef EMBER_FROM_ROW

// keys_t[i], lane t: dim i of key t (at keys + t * stride), for t < count (0 for the rest).
template <int C>
void TransposeKeys(const float* keys, int64_t stride, int64_t count, Vec* keys_t) {
  for (int c = 0; c < C; ++c) {
    Vec x[16];
    for (int t = 0; t < 16; ++t) x[t] = t < count ? LoadVec(keys + t * stride + 16 * c) : Vec{};
    SwapBlocks<8>(x);
    SwapBlocks<4>(x);
    SwapBlocks<2>(x);
    SwapBlocks<1>(x);
    for (int i = 0; i < 16; ++i) keys_t[16 * c + i] = x[i];
  }
}

// scores[b], lane t: q[b] . key t, from the transposed keys.
template <int C, int B>
inline void ScoreTransposed(const Vec* keys_t, const float* const (&q)[B], Vec (&scores)[B]) {
  Vec even[B], odd[B];   // two chains per query: the FMAs' latency hidden
  for (int b = 0; b < B; ++b) even[b] = odd[b] = Vec{};
  for (int i = 0; i < 16 * C; i += 2) {
    const Vec k0 = keys_t[i], k1 = keys_t[i + 1];
    for (int b = 0; b < B; ++b) {
      even[b] += q[b][i] * k0;
      odd[b] += q[b][i + 1] * k1;
    }
  }
  for (int b = 0; b < B; ++b) scores[b] = even[b] + odd[b];
}

// acc[b] += sum over t < count of weights[b][t] * values[t * stride], for every query b. A key
// a query does not see weighs 0; every key here lies at or before the item's last row, so
// (the page table being right) its value was written and adds nothing.
template <int C, int B>
inline void AddValuesOfBlock(const float (*weights)[16], const float* values, int64_t stride,
                             int64_t count, float* const (&acc)[B]) {
  Vec sum[B][C];
  for (int b = 0; b < B; ++b) {
    for (int c = 0; c < C; ++c) sum[b][c] = LoadVec(acc[b] + 16 * c);
  }
  for (int64_t t = 0; t < count; ++t) {
    Vec value[C];
    for (int c = 0; c < C; ++c) value[c] = LoadVec(values + t * stride + 16 * c);
    for (int b = 0; b < B; ++b) {
      const float weight = weights[b][t];
      for (int c = 0; c < C; ++c) sum[b][c] += weight * value[c];
    }
  }
  for (int b = 0; b < B; ++b) std::memcpy(acc[b], sum[b], sizeof sum[b]);
}

#endif  // __AVX512F__

typedef int32_t IntVec __attribute__((vector_size(64)));

// scores' finite lanes become soft_cap * tanh(score / soft_cap), where soft_cap > 0 (V a Vec
// or Lanes).
template <typename V>
inline void SoftCap(V& scores, float soft_cap) {
  if (soft_cap <= 0.0f) return;
  for (int i = 0; i < int(sizeof(V) / sizeof(float)); ++i) {
    if (scores[i] != kNegInf) scores[i] = soft_cap * std::tanh(scores[i] / soft_cap);
  }
}

// The lane-wise maximum, of a Vec or Lanes.
template <typename V>
inline V Max(V a, V b) { return a > b ? a : b; }

// ExpNonPositive, lane by lane (V a Vec or Lanes; Ints its lanes as int32, the type of a
// comparison's result).
template <typename V>
inline V ExpNonPositive(V x) {
  using Ints = decltype(x < x);
  x = x < -87.0f ? V{} - 87.0f : x;
  const V t = x * 1.44269504088896341f + 0.5f;
  V n = __builtin_convertvector(__builtin_convertvector(t, Ints), V);   // toward 0
  n = n > t ? n - 1.0f : n;                                             // floor
  const V y = ExpOfRest(x, n);
  const Ints bits = (__builtin_convertvector(n, Ints) + 127) << 23;
  V scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return y * scale;
}

// The largest lane and the sum of the lanes, by halving (a loop over the lanes would be a
// chain of 16 dependent scalar operations).
inline float MaxLane(Vec x) {
  x = Max(x, __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7));
  x = Max(x, __builtin_shufflevector(x, x, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11));
  x = Max(x, __builtin_shufflevector(x, x, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13));
  x = Max(x, __builtin_shufflevector(x, x, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14));
  return x[0];
}

inline float SumLane(Vec x) {
  x += __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
  x += __builtin_shufflevector(x, x, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
  x += __builtin_shufflevector(x, x, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  x += __builtin_shufflevector(x, x, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
  return x[0];
}

// One query's online-softmax update for the scores of keys first .. first + 15 (lane t: key
// first + t), of which it sees [see_lo, see_hi]: returns the keys' weights (0 where unseen),
// with running_max, running_sum and acc[d] brought to the new maximum.
// With 8-float registers (AVX) it runs on the 16 scores as two Lanes: GCC converts a 16-float
// vector's lanes to integers one at a time there.
#if !defined(__AVX512F__) && defined(__AVX__)
inline float MaxLane(Lanes x) {
  x = Max(x, __builtin_shufflevector(x, x, 4, 5, 6, 7, 0, 1, 2, 3));
  x = Max(x, __builtin_shufflevector(x, x, 2, 3, 0, 1, 6, 7, 4, 5));
  x = Max(x, __builtin_shufflevector(x, x, 1, 0, 3, 2, 5, 4, 7, 6));
  return x[0];
}

inline float SumLane(Lanes x) {
  x += __builtin_shufflevector(x, x, 4, 5, 6, 7, 0, 1, 2, 3);
  x += __builtin_shufflevector(x, x, 2, 3, 0, 1, 6, 7, 4, 5);
  x += __builtin_shufflevector(x, x, 1, 0, 3, 2, 5, 4, 7, 6);
  return x[0];
}

inline Vec SoftmaxUpdate(Vec all_scores, int64_t first, int64_t see_lo, int64_t see_hi,
                         float soft_cap, float& running_max, float& running_sum, float* acc,
                         int64_t d) {
  typedef int32_t IntLanes __attribute__((vector_size(4 * kLanes)));
  Lanes scores[2];
  std::memcpy(scores, &all_scores, sizeof scores);
  for (int h = 0; h < 2; ++h) {
    const IntLanes key = IntLanes{0, 1, 2, 3, 4, 5, 6, 7} + static_cast<int32_t>(first + 8 * h);
    const IntLanes seen =
        (key >= static_cast<int32_t>(see_lo)) & (key <= static_cast<int32_t>(see_hi));
    scores[h] = seen ? scores[h] : Lanes{} + kNegInf;
    SoftCap(scores[h], soft_cap);
  }
  const float chunk_max = MaxLane(Max(scores[0], scores[1]));
  if (chunk_max == kNegInf) return Vec{};   // every seen score is -inf: adds nothing
  RaiseMax(chunk_max, running_max, running_sum, acc, d);
  Lanes weights[2];
  for (int h = 0; h < 2; ++h) {
    weights[h] = scores[h] == kNegInf ? Lanes{} : ExpNonPositive(scores[h] - running_max);
  }
  running_sum += SumLane(weights[0] + weights[1]);
  Vec out;
  std::memcpy(&out, weights, sizeof out);
  return out;
}
#else
inline Vec SoftmaxUpdate(Vec scores, int64_t first, int64_t see_lo, int64_t see_hi,
                         float soft_cap, float& running_max, float& running_sum, float* acc,
                         int64_t d) {
  const IntVec key = IntVec{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15} +
                     static_cast<int32_t>(first);
  const IntVec seen =
      (key >= static_cast<int32_t>(see_lo)) & (key <= static_cast<int32_t>(see_hi));
  scores = seen ? scores : Vec{} + kNegInf;
  SoftCap(scores, soft_cap);
  const float chunk_max = MaxLane(scores);
  if (chunk_max == kNegInf) return Vec{};   // every seen score is -inf: adds nothing
  RaiseMax(chunk_max, running_max, running_sum, acc, d);
  const Vec weights = scores == kNegInf ? Vec{} : ExpNonPositive(scores - running_max);
  running_sum += SumLane(weights);
  return weights;
}
#endif  // AVX without AVX-512
#endif

struct Problem {
  const void* q;            // [T, Hq, D]
  ffi::DataType q_type;
  void* out;                // [T, Hq, D], q's dtype
  const void* kv;           // [num_pages, page_size, 2 * Hkv, D]
  ffi::DataType kv_type;
  const float* scales;      // [num_pages, page_size, 2 * Hkv], or null for a float cache
  const int32_t* kv_lens;   // [S]
  const int32_t* page_indices;  // [S, P]
  const int32_t* cu_q_lens;     // [S + 1]
  int64_t num_rows, num_q_heads, head_dim, num_pages, page_size, num_kv_heads, max_pages;
  float sm_scale, soft_cap;     // soft_cap 0: none
  int64_t sliding_window;       // 0: none
};

struct WorkItem {
  int64_t seq, first_row, num_rows, first_head, num_heads;  // kv heads [first, first + num)
};

// Per-thread buffers, grown as needed.
struct Scratch {
#if defined(EMBER_VECTOR_PAGES) && !defined(EMBER_HEADWISE_PAGES)
  std::vector<Vec> weights;   // per query: its scores, then weights, of 16 keys
#endif
  std::vector<float> queries, scores, acc, running_max, running_sum, tile;
  std::vector<int64_t> positions;        // per row of the item
  std::vector<int64_t> query_position;   // per query: its row's position
  std::vector<int64_t> query_channel;    // per query: its K's offset in a slot's K/V (x D)
#ifdef EMBER_HEADWISE_PAGES
  std::vector<Vec> keys_t;               // one kv head's 16 keys, transposed
  std::vector<int64_t> order;            // the queries, kv head by kv head
#endif
};

#ifdef EMBER_HEADWISE_PAGES
// The B queries order[0 .. B) of one kv head, given their scores of `count` keys from key_lo
// on (values at values + t * stride): their online softmax updated, the values added.
template <int C, int B>
void BlockOfScores(const Problem& p, Scratch& s, const int64_t* order, const Vec (&scores)[B],
                   const float* values, int64_t stride, int64_t key_lo, int64_t count) {
  const int64_t d = p.head_dim, key_hi = key_lo + count - 1;
  float* acc[B];
  float weights[B][16];
  for (int b = 0; b < B; ++b) {
    const int64_t m = order[b], position = s.query_position[m];
    const int64_t see_lo = p.sliding_window > 0 ? position - p.sliding_window + 1 : 0;
    acc[b] = &s.acc[m * d];
    const Vec w = position < key_lo || see_lo > key_hi
        ? Vec{}   // sees none of these keys
        : SoftmaxUpdate(scores[b], key_lo, see_lo, std::min(position, key_hi), p.soft_cap,
                        s.running_max[m], s.running_sum[m], acc[b], d);
    std::memcpy(weights[b], &w, sizeof w);
  }
  AddValuesOfBlock<C, B>(weights, values, stride, count, acc);
}

// The B queries order[0 .. B) scored from the transposed keys (s.keys_t), then as above.
template <int C, int B>
void BlockAgainstKeys(const Problem& p, Scratch& s, const int64_t* order, const float* values,
                      int64_t stride, int64_t key_lo, int64_t count) {
  const float* q[B];
  for (int b = 0; b < B; ++b) q[b] = &s.queries[order[b] * p.head_dim];
  Vec scores[B];
  ScoreTransposed<C, B>(s.keys_t.data(), q, scores);
  BlockOfScores<C, B>(p, s, order, scores, values, stride, key_lo, count);
}

// All n queries of order[0 .. n), B at a time, then the rest in smaller blocks.
template <int C, int B>
void QueriesAgainstKeys(const Problem& p, Scratch& s, const int64_t* order, int64_t n,
                        const float* values, int64_t stride, int64_t key_lo, int64_t count) {
  int64_t b = 0;
  for (; b + B <= n; b += B) {
    BlockAgainstKeys<C, B>(p, s, order + b, values, stride, key_lo, count);
  }
  if constexpr (B > 1) {
    if (b < n) {
      QueriesAgainstKeys<C, B - 1>(p, s, order + b, n - b, values, stride, key_lo, count);
    }
  }
}
#endif

// C > 0: a head of 16 * C dims, in vectors (EMBER_VECTOR_PAGES); C = 0: any head size.
template <int C>
void Attend(const Problem& p, const WorkItem& item, Scratch& s) {
  const int64_t d = p.head_dim, group = p.num_q_heads / p.num_kv_heads;
  const int64_t per_row = item.num_heads * group;             // queries per row
  const int64_t num_queries = item.num_rows * per_row;        // query m: row m / per_row
  const int64_t q_len = p.cu_q_lens[item.seq + 1] - p.cu_q_lens[item.seq];
  const int64_t kv_len = p.kv_lens[item.seq];
  const int64_t context = std::min<int64_t>(kv_len, p.max_pages * p.page_size);  // readable
  s.queries.resize(num_queries * d);
  s.acc.assign(num_queries * d, 0.0f);
  s.running_max.assign(num_queries, kNegInf);
  s.running_sum.assign(num_queries, 0.0f);
  s.scores.resize(p.page_size);
  s.positions.resize(item.num_rows);
  s.query_position.resize(num_queries);
  s.query_channel.resize(num_queries);
  for (int64_t r = 0; r < item.num_rows; ++r) {
    const int64_t row = item.first_row + r;
    s.positions[r] = kv_len - q_len + (row - p.cu_q_lens[item.seq]);
    for (int64_t h = 0; h < per_row; ++h) {
      s.query_position[r * per_row + h] = s.positions[r];
      s.query_channel[r * per_row + h] = 2 * (h / group) * d;
    }
    for (int64_t h = 0; h < per_row; ++h) {
      float* query = &s.queries[(r * per_row + h) * d];
      LoadRow(p.q, (row * p.num_q_heads + item.first_head * group + h) * d, d, p.q_type,
              1.0f, query);
      for (int64_t i = 0; i < d; ++i) query[i] *= p.sm_scale;
    }
  }
  // Keys any of these rows sees: [lo, hi].
  const int64_t hi = std::min(s.positions[item.num_rows - 1], context - 1);
  const int64_t lo = p.sliding_window > 0
                         ? std::max<int64_t>(0, s.positions[0] - p.sliding_window + 1) : 0;
  if (hi < lo) return;
  const int64_t two_kv_heads = 2 * p.num_kv_heads;
  const int64_t token_stride = two_kv_heads * d;              // elements between slots
  const int64_t kv_width = 2 * item.num_heads * d;            // this item's K/V of one slot
  const bool direct = p.kv_type == ffi::DataType::F32 && p.scales == nullptr;
  s.tile.resize(p.page_size * kv_width);
#ifdef EMBER_HEADWISE_PAGES
  const int64_t per_head = item.num_rows * group;   // queries of each kv head
  if constexpr (C > 0) {
    s.keys_t.resize(16 * C);
    s.order.resize(num_queries);
    for (int64_t j = 0; j < item.num_heads; ++j) {
      for (int64_t r = 0; r < item.num_rows; ++r) {
        for (int64_t g = 0; g < group; ++g) {
          s.order[j * per_head + r * group + g] = r * per_row + j * group + g;
        }
      }
    }
  }
#elif defined(EMBER_VECTOR_PAGES)
  if constexpr (C > 0) s.weights.resize(num_queries);
#endif
  for (int64_t page_no = lo / p.page_size; page_no <= hi / p.page_size; ++page_no) {
    int64_t page = p.page_indices[item.seq * p.max_pages + page_no];
    if (page < 0 || page >= p.num_pages) page = 0;
    const int64_t first = std::max(lo, page_no * p.page_size);
    const int64_t last = std::min(hi, page_no * p.page_size + p.page_size - 1);
    const int64_t count = last - first + 1;
    const int64_t slot0 = first - page_no * p.page_size;
    // kv(t, c): K (c = 0) or V (c = 1) of this item's head j for token first + t.
    const float* base;
    int64_t stride;
    if (direct) {
      base = static_cast<const float*>(p.kv) +
             (page * p.page_size + slot0) * token_stride + 2 * item.first_head * d;
      stride = token_stride;
    } else {
      for (int64_t t = 0; t < count; ++t) {
        const int64_t slot = page * p.page_size + slot0 + t;
        for (int64_t c = 0; c < 2 * item.num_heads; ++c) {
          const int64_t channel = 2 * item.first_head + c;
          const float scale = p.scales ? p.scales[slot * two_kv_heads + channel] : 1.0f;
          LoadRow(p.kv, (slot * two_kv_heads + channel) * d, d, p.kv_type, scale,
                  &s.tile[t * kv_width + c * d]);
        }
      }
      base = s.tile.data();
      stride = kv_width;
    }
#ifdef EMBER_VECTOR_PAGES
    if constexpr (C > 0) {
#ifdef EMBER_HEADWISE_PAGES
      // 16 keys at a time, kv head by kv head, blocks of its queries.
      for (int64_t t0 = 0; t0 < count; t0 += 16) {
        const int64_t n = std::min<int64_t>(16, count - t0);
        const float* keys = base + t0 * stride;
        for (int64_t j = 0; j < item.num_heads; ++j) {
          const int64_t* order = &s.order[j * per_head];
          const float* head_keys = keys + 2 * j * d;
          if (per_head == 1) {   // a lone query: the transposition would cost more than it saves
            const Vec scores[1] = {ScoreKeys<C>(&s.queries[order[0] * d], head_keys, stride, n)};
            BlockOfScores<C, 1>(p, s, order, scores, head_keys + d, stride, first + t0, n);
            continue;
          }
          TransposeKeys<C>(head_keys, stride, n, s.keys_t.data());
          QueriesAgainstKeys<C, QueryBlock<C>()>(p, s, order, per_head, head_keys + d, stride,
                                                 first + t0, n);
        }
      }
#else
      // 16 keys at a time: every query's scores, then their online-softmax updates, then
      // their values (each phase's loads independent of one another).
      for (int64_t t0 = 0; t0 < count; t0 += 16) {
        const int64_t n = std::min<int64_t>(16, count - t0);
        const float* keys = base + t0 * stride;
        const int64_t key_lo = first + t0, key_hi = first + t0 + n - 1;
        for (int64_t m = 0; m < num_queries; ++m) {
          s.weights[m] = ScoreKeys<C>(&s.queries[m * d], keys + s.query_channel[m], stride, n);
        }
        for (int64_t m = 0; m < num_queries; ++m) {
          const int64_t position = s.query_position[m];
          const int64_t see_lo = p.sliding_window > 0 ? position - p.sliding_window + 1 : 0;
          s.weights[m] = position < key_lo || see_lo > key_hi
              ? Vec{}   // sees none of these keys
              : SoftmaxUpdate(s.weights[m], key_lo, see_lo, std::min(position, key_hi),
                              p.soft_cap, s.running_max[m], s.running_sum[m], &s.acc[m * d],
                              d);
        }
        for (int64_t m = 0; m < num_queries; ++m) {
          AddValues<C>(s.weights[m], keys + s.query_channel[m] + d, stride, n, &s.acc[m * d]);
        }
      }
#endif
      continue;
    }
#endif
    // Any head size: query by query, the page's scores, online-softmax update and values.
    for (int64_t m = 0; m < num_queries; ++m) {
      const int64_t position = s.query_position[m];
      // The keys this query sees, [see_lo, see_hi], of the page's [first, last].
      const int64_t see_lo = std::max(first, p.sliding_window > 0
                                                 ? position - p.sliding_window + 1 : first);
      const int64_t see_hi = std::min(last, position);
      if (see_hi < see_lo) continue;   // nothing visible: the query's state stays as it is
      const float* keys = base + s.query_channel[m];
      float* scores = s.scores.data();   // this query's, for this page
      float* acc = &s.acc[m * d];
      float& running_max = s.running_max[m];
      float& running_sum = s.running_sum[m];
      float chunk_max = kNegInf;
      for (int64_t t = 0; t < count; ++t) {
        const int64_t key = first + t;
        float score = kNegInf;
        if (key >= see_lo && key <= see_hi) {
          score = Dot(&s.queries[m * d], keys + t * stride, d);
          if (p.soft_cap > 0.0f) score = p.soft_cap * std::tanh(score / p.soft_cap);
        }
        scores[t] = score;
        chunk_max = std::max(chunk_max, score);
      }
      if (chunk_max == kNegInf) continue;   // every visible score is -inf: adds nothing
      RaiseMax(chunk_max, running_max, running_sum, acc, d);
      const float new_max = running_max;
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t t = 0; t < count; ++t) {
        const float weight = ExpNonPositive(scores[t] - new_max);
        scores[t] = scores[t] == kNegInf ? 0.0f : weight;
        sum += scores[t];
      }
      running_sum += sum;
      for (int64_t t = 0; t < count; ++t) {
        const float weight = scores[t];
        if (weight == 0.0f) continue;   // not visible (or underflowed: adds nothing)
        const float* value = keys + d + t * stride;
#pragma omp simd
        for (int64_t i = 0; i < d; ++i) acc[i] += weight * value[i];
      }
    }
  }
  for (int64_t m = 0; m < num_queries; ++m) {
    float* acc = &s.acc[m * d];
    const float inverse = 1.0f / std::max(s.running_sum[m], 1e-30f);
    for (int64_t i = 0; i < d; ++i) acc[i] *= inverse;
    const int64_t row = item.first_row + m / per_row;
    const int64_t q_head = item.first_head * group + m % per_row;
    StoreRow(acc, d, p.q_type, p.out, (row * p.num_q_heads + q_head) * d);
  }
}

// The instance for the problem's head size.
using AttendFn = void (*)(const Problem&, const WorkItem&, Scratch&);
AttendFn AttendFor(int64_t head_dim) {
#ifdef EMBER_VECTOR_PAGES
  switch (head_dim) {
    case 16: return Attend<1>;
    case 32: return Attend<2>;
    case 48: return Attend<3>;
    case 64: return Attend<4>;
    case 80: return Attend<5>;
    case 96: return Attend<6>;
    case 128: return Attend<8>;
    case 256: return Attend<16>;
  }
#endif
  return Attend<0>;
}

// The work items of live sequences: row blocks of kRowBlock rows; the kv heads split in as
// many groups as keep every thread busy when there are few row blocks (a lone decode).
std::vector<WorkItem> Plan(const Problem& p, int64_t num_seqs, int64_t num_threads) {
  std::vector<WorkItem> blocks;
  for (int64_t seq = 0; seq < num_seqs; ++seq) {
    const int64_t start = std::max<int64_t>(0, p.cu_q_lens[seq]);
    const int64_t end = std::min<int64_t>(p.num_rows, p.cu_q_lens[seq + 1]);
    for (int64_t row = start; row < end; row += kRowBlock) {
      blocks.push_back({seq, row, std::min(kRowBlock, end - row), 0, p.num_kv_heads});
    }
  }
  const int64_t wanted = 2 * num_threads;
  const int64_t splits = std::min<int64_t>(
      p.num_kv_heads, blocks.empty() ? 1 : (wanted + blocks.size() - 1) / blocks.size());
  if (splits <= 1) return blocks;
  std::vector<WorkItem> items;
  for (const WorkItem& block : blocks) {
    for (int64_t part = 0; part < splits; ++part) {
      const int64_t head0 = part * p.num_kv_heads / splits;
      const int64_t head1 = (part + 1) * p.num_kv_heads / splits;
      if (head1 > head0) items.push_back({block.seq, block.first_row, block.num_rows, head0,
                                          head1 - head0});
    }
  }
  return items;
}

bool SupportedQ(ffi::DataType t) {
  return t == ffi::DataType::F32 || t == ffi::DataType::BF16 || t == ffi::DataType::F16;
}

bool SupportedKv(ffi::DataType t) {
  return SupportedQ(t) || t == ffi::DataType::S8 || t == ffi::DataType::F8E4M3FN;
}

ffi::Error RaggedPagedAttention(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer kv_pages,
                                ffi::Buffer<ffi::F32> kv_scales, ffi::Buffer<ffi::S32> kv_lens,
                                ffi::Buffer<ffi::S32> page_indices,
                                ffi::Buffer<ffi::S32> cu_q_lens, ffi::Buffer<ffi::S32> num_seqs,
                                ffi::Result<ffi::AnyBuffer> out, float sm_scale,
                                int64_t sliding_window, float soft_cap) {
  auto q_dims = q.dimensions();
  auto kv_dims = kv_pages.dimensions();
  auto table_dims = page_indices.dimensions();
  if (q_dims.size() != 3 || kv_dims.size() != 4 || table_dims.size() != 2 ||
      !SupportedQ(q.element_type()) || !SupportedKv(kv_pages.element_type()) ||
      out->element_type() != q.element_type() || kv_dims[3] != q_dims[2] || kv_dims[2] % 2 ||
      q_dims[1] % (kv_dims[2] / 2)) {
    return ffi::Error::InvalidArgument("ember_ragged_paged_attention: unexpected shapes or "
                                       "dtypes (pallas_kernels/__init__.py checks them)");
  }
  const ffi::DataType kv_type = kv_pages.element_type();
  const bool quantized = kv_type == ffi::DataType::S8 || kv_type == ffi::DataType::F8E4M3FN;
  const Problem p{q.untyped_data(), q.element_type(), out->untyped_data(),
                  kv_pages.untyped_data(), kv_type,
                  quantized ? kv_scales.typed_data() : nullptr, kv_lens.typed_data(),
                  page_indices.typed_data(), cu_q_lens.typed_data(), q_dims[0], q_dims[1],
                  q_dims[2], kv_dims[0], kv_dims[1], kv_dims[2] / 2, table_dims[1], sm_scale,
                  soft_cap, sliding_window};
  std::memset(out->untyped_data(), 0, out->size_bytes());
  const int64_t max_seqs = kv_lens.dimensions()[0];
  const int64_t live = std::clamp<int64_t>(num_seqs.typed_data()[0], 0, max_seqs);
  const AttendFn attend = AttendFor(p.head_dim);
  const std::vector<WorkItem> items = Plan(p, live, std::max<int64_t>(1, pool.num_threads()));
  // The K/V bytes the query rows read (each its sequence's context): what it costs.
  const int64_t token_bytes = 2 * p.num_kv_heads * p.head_dim *
                              (quantized ? 1 : kv_type == ffi::DataType::F32 ? 4 : 2);
  int64_t bytes = 0;
  for (int64_t s = 0; s < live; ++s) {
    const int64_t rows = std::clamp<int64_t>(p.cu_q_lens[s + 1] - p.cu_q_lens[s], 0, p.num_rows);
    bytes += rows * std::max<int64_t>(p.kv_lens[s], 0) * token_bytes;
  }
  ember_cpu::ForEachItem(pool, static_cast<int64_t>(items.size()), [&](int64_t i) {
    thread_local Scratch scratch;
    attend(p, items[i], scratch);
  }, ember_cpu::HelpersFor(bytes));
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(EmberRaggedPagedAttention, RaggedPagedAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()           // q
                                  .Arg<ffi::AnyBuffer>()           // kv_pages
                                  .Arg<ffi::Buffer<ffi::F32>>()    // kv_scales (or a dummy)
                                  .Arg<ffi::Buffer<ffi::S32>>()    // kv_lens
                                  .Arg<ffi::Buffer<ffi::S32>>()    // page_indices
                                  .Arg<ffi::Buffer<ffi::S32>>()    // cu_q_lens
                                  .Arg<ffi::Buffer<ffi::S32>>()    // num_seqs
                                  .Ret<ffi::AnyBuffer>()           // out
                                  .Attr<float>("sm_scale")
                                  .Attr<int64_t>("sliding_window")
                                  .Attr<float>("soft_cap"));
