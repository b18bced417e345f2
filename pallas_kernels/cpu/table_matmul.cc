// x @ table.T for a few rows of x and an int8 table held one output per row, on the CPU, through
// the XLA FFI: an LM head (its own tensor, or the embedding table it is tied to) read straight
// from a GGUF file's Q8_0 blocks.
//
// Layout: q i8[out, in] with scale f32|f16[out, in / 32] (table[o, i] = q[o, i] scale[o, i / 32]),
// the GGUF tensor's own order (a token's row, its blocks along the hidden size); x f32[T, in],
// out f32[T, out].
//
// Why it exists: the head's weight, [vocab, hidden] (a tied head's is the embedding table), held
// in f32 is the largest read of a small model's decode step (SmolLM2-135M: 113 MB of 180 MB a
// token), and XLA's dot reads it at copy speed; its Q8_0 blocks are a quarter of that.
// quantized_matmul.cc reads [in, out] weights, whose passes stride over rows; here each output's
// weights are one contiguous run, read once from start to end, converted in registers and scaled
// per block.
//
// Work items are runs of kItemRows outputs, on the caller and helper threads as the table's size
// asks (for_each_item.h).

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "for_each_item.h"
#include "vec16.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// The target's own vector width (vec16.h): sums and weights stay in registers.
using ember_cpu::kLanes;
using ember_cpu::Lanes;

constexpr int64_t kBlock = 32;      // inputs per scale: a Q8_0 block
constexpr int kParts = kBlock / kLanes;
constexpr int64_t kItemRows = 256;  // outputs of a work item (~150 KB of SmolLM2's table)
constexpr int kMaxRows = 8;         // rows of x a pass takes at once
// Sums a pass keeps in registers (rows x outputs, each kParts vectors), beside the outputs'
// converted weights: 32 registers with AVX-512, 16 without.
constexpr int kAccs = kLanes == 16 ? 16 : 4;

// kLanes signed bytes as floats.
inline Lanes Widen(const int8_t* p) {
  Lanes out;
#if defined(__AVX512F__)
  const __m512 v = _mm512_cvtepi32_ps(
      _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  std::memcpy(&out, &v, sizeof out);
#elif defined(__AVX2__)
  const __m256 v = _mm256_cvtepi32_ps(
      _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  std::memcpy(&out, &v, sizeof out);
#else
  for (int i = 0; i < kLanes; ++i) out[i] = p[i];
#endif
  return out;
}

// The sum of a vector's lanes, as a tree.
inline float Sum(Lanes v) {
#if defined(__AVX512F__)
  __m512 m;
  std::memcpy(&m, &v, sizeof m);
  return _mm512_reduce_add_ps(m);
#else
  float lanes[kLanes];
  std::memcpy(lanes, &v, sizeof lanes);
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int i = 0; i < width; ++i) lanes[i] += lanes[i + width];
  }
  return lanes[0];
#endif
}

struct Problem {
  const float* x;        // [T, in]
  const int8_t* q;       // [out, in]
  const void* scale;     // [out, in / 32], f32 or f16
  bool scale_f16;
  float* y;              // [T, out]
  int64_t tokens, in, out;
};

inline float ScaleAt(const Problem& p, int64_t index) {
  return p.scale_f16 ? float(static_cast<const _Float16*>(p.scale)[index])
                     : static_cast<const float*>(p.scale)[index];
}

// y[t, o] for rows t0 <= t < t0 + T and outputs [first, first + R): each output's row of the
// table block by block, the block's 32 weights converted and scaled once for the T rows. The R
// outputs' T x R sums are independent chains, which keep the adds' latency hidden.
template <int T, int R>
void Outputs(const Problem& p, const float* x, int64_t t0, int64_t first) {
  const int64_t blocks = p.in / kBlock;
  Lanes acc[T][R] = {};
  for (int64_t b = 0; b < blocks; ++b) {
    Lanes w[R][kParts];
    float s[R];
    for (int r = 0; r < R; ++r) {
      const int8_t* block = p.q + (first + r) * p.in + b * kBlock;
      s[r] = ScaleAt(p, (first + r) * blocks + b);
      for (int i = 0; i < kParts; ++i) {
        w[r][i] = Widen(block + i * kLanes);
        if constexpr (T > 2) w[r][i] *= s[r];   // more rows: scaled once for all of them
      }
    }
    for (int t = 0; t < T; ++t) {
      const float* xt = x + t * p.in + b * kBlock;
      Lanes xs[kParts];
      for (int i = 0; i < kParts; ++i) xs[i] = ember_cpu::LoadLanes(xt + i * kLanes);
      for (int r = 0; r < R; ++r) {
        if constexpr (T > 2) {
          for (int i = 0; i < kParts; ++i) acc[t][r] += w[r][i] * xs[i];
        } else {                                 // one or two rows: each block's sum scaled
          Lanes sum = w[r][0] * xs[0];
          for (int i = 1; i < kParts; ++i) sum += w[r][i] * xs[i];
          acc[t][r] += s[r] * sum;
        }
      }
    }
  }
  for (int t = 0; t < T; ++t) {
    for (int r = 0; r < R; ++r) p.y[(t0 + t) * p.out + first + r] = Sum(acc[t][r]);
  }
}

// The same for outputs [first, end), R at a time, then one at a time.
template <int T>
void Rows(const Problem& p, int64_t t0, int64_t first, int64_t end) {
  constexpr int R = std::max(1, std::min(kAccs / 2, kAccs / T));
  const float* x = p.x + t0 * p.in;
  int64_t o = first;
  for (; o + R <= end; o += R) Outputs<T, R>(p, x, t0, o);
  for (; o < end; ++o) Outputs<T, 1>(p, x, t0, o);
}

void Item(const Problem& p, int64_t first, int64_t end) {
  int64_t t = 0;
  for (; t + kMaxRows <= p.tokens; t += kMaxRows) Rows<kMaxRows>(p, t, first, end);
  switch (p.tokens - t) {
    case 1: Rows<1>(p, t, first, end); break;
    case 2: Rows<2>(p, t, first, end); break;
    case 3: Rows<3>(p, t, first, end); break;
    case 4: Rows<4>(p, t, first, end); break;
    case 5: Rows<5>(p, t, first, end); break;
    case 6: Rows<6>(p, t, first, end); break;
    case 7: Rows<7>(p, t, first, end); break;
    default: break;
  }
}

ffi::Error TableMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> q,
                       ffi::AnyBuffer scale, ffi::Result<ffi::Buffer<ffi::F32>> out) {
  auto x_dims = x.dimensions(), q_dims = q.dimensions(), s_dims = scale.dimensions();
  const bool shapes_ok =
      x_dims.size() == 2 && q_dims.size() == 2 && s_dims.size() == 2 &&
      x_dims[1] == q_dims[1] && q_dims[1] % kBlock == 0 && s_dims[0] == q_dims[0] &&
      s_dims[1] * kBlock == q_dims[1] &&
      (scale.element_type() == ffi::DataType::F32 || scale.element_type() == ffi::DataType::F16);
  if (!shapes_ok) {
    return ffi::Error::InvalidArgument("ember_table_matmul: unexpected shapes or dtypes "
                                       "(models/quantization.py checks them)");
  }
  const Problem p{x.typed_data(), q.typed_data(), scale.untyped_data(),
                  scale.element_type() == ffi::DataType::F16, out->typed_data(), x_dims[0],
                  q_dims[1], q_dims[0]};
  if (p.tokens == 0 || p.out == 0) return ffi::Error::Success();
  const int64_t items = (p.out + kItemRows - 1) / kItemRows;
  ember_cpu::ForEachItem(pool, items, [&](int64_t item) {
    Item(p, item * kItemRows, std::min(p.out, (item + 1) * kItemRows));
  }, ember_cpu::HelpersFor(p.tokens * (q.size_bytes() + scale.size_bytes())));
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(EmberTableMatmul, TableMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()    // x
                                  .Arg<ffi::Buffer<ffi::S8>>()     // q
                                  .Arg<ffi::AnyBuffer>()           // scale
                                  .Ret<ffi::Buffer<ffi::F32>>());  // out
