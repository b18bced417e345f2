// x @ w for a few rows of x and an int8 or int4 weight, on the CPU, through the XLA FFI.
//
// Layouts are models/quantization.py's: Int8Weight q i8[in, out] with scale f32|f16[in / group,
// out] (w = q * scale); Int4Weight packed u8[in / 2, out] (for group g and j < 16, packed[16g + j]
// holds q[32g + j] in its low nibble and q[32g + 16 + j] in its high one) with scale and minimum
// f32|f16[in / 32, out] (w = q * scale + minimum). x f32[T, in], out f32[T, out].
//
// Why it exists: XLA's CPU backend never fuses the int-to-float conversion into a dot, so the
// step converts a block of weights to f32 in memory before each small dot (models/quantization.py)
// and a decode reads and writes every weight several times over. Here the weights are
// converted in registers and folded into per-group sums: sum_i x_i (q_i s + m) =
// s sum_i x_i q_i + m sum_i x_i.
//
// A pass takes 32 inputs (a group's rows, contiguous in memory) for every column of a work
// item, kLanes NV columns at a time, and asks for the rows two passes ahead (the hardware's
// prefetch does not follow the pass's way over 16 rows: without it, 20 GB/s instead of 35 on
// 4096 x 14336 int4). Work items are panels of columns, each split along the inputs when
// there are too few panels for the threads; helpers are woken only for large products
// (for_each_item.h). A weight stacked over scanned layers is read in place (layer_stack.h).

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "for_each_item.h"
#include "layer_stack.h"
#include "vec16.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using ember_cpu::kLanes;
using ember_cpu::Lanes;
using ember_cpu::LoadLanes;

// The target's own registers (vec16.h): 16-float vectors wider than a register would stay in
// memory between operations (GCC has no machine mode for them), several times slower.
typedef int32_t Ints __attribute__((vector_size(4 * kLanes)));   // kLanes lanes, as Lanes

// kLanes bytes, or kLanes halves, widened to kLanes lanes. GCC's __builtin_convertvector does
// these a lane at a time, so the widening loads are the instructions themselves where the
// target has them.
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__F16C__))
template <typename V, typename M>
inline V As(M m) {
  V v;
  std::memcpy(&v, &m, sizeof v);
  return v;
}
#endif
#if defined(__AVX512F__)
inline Ints WidenUnsigned(const uint8_t* p) {
  return As<Ints>(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline Ints WidenSigned(const int8_t* p) {
  return As<Ints>(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline Lanes WidenHalves(const _Float16* p) {
  return As<Lanes>(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
}
#elif defined(__AVX2__) && defined(__F16C__)
inline Ints WidenUnsigned(const uint8_t* p) {
  return As<Ints>(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline Ints WidenSigned(const int8_t* p) {
  return As<Ints>(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline Lanes WidenHalves(const _Float16* p) {
  return As<Lanes>(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
#else
template <typename V, typename T>
inline V Widen(const T* p) {
  V v;
  for (int i = 0; i < kLanes; ++i) v[i] = p[i];
  return v;
}
inline Ints WidenUnsigned(const uint8_t* p) { return Widen<Ints>(p); }
inline Ints WidenSigned(const int8_t* p) { return Widen<Ints>(p); }
inline Lanes WidenHalves(const _Float16* p) { return Widen<Lanes>(p); }
#endif

inline Lanes ToFloats(Ints v) { return __builtin_convertvector(v, Lanes); }

constexpr int64_t kChunk = 32;   // input rows a pass takes: an int4 group, a Q8_0 block
constexpr int64_t kPanel = 1024;  // columns of a work item at most
// Chunks ahead whose weights a pass asks the memory for, one cache line for each line it reads:
// the hardware's own prefetch does not follow the way a pass steps over 16 rows.
constexpr int64_t kAhead = 2;

// Rows of x a pass takes at once, and registers of kLanes columns it keeps for each: its sums
// (T x NV registers, two sets for int4) and temporaries must fit the registers, 32 with
// AVX-512, 16 with AVX or SSE (eight sums there).
constexpr int kMaxRows = 4;
#ifdef __AVX512F__
constexpr int VecsFor(int rows, bool) { return rows <= 2 ? 4 : 2; }
#else
constexpr int VecsFor(int rows, bool int4) {
  return std::max(1, std::min(4, 8 / (rows * (int4 ? 2 : 1))));
}
#endif

struct Problem {
  const float* x;          // [T, in]
  const float* x_sums;     // [T, in / 32]: each int4 group's sum of x
  const void* weight;      // i8[in, out] or u8[in / 2, out]
  const void* scale;       // [in / group, out]
  const void* minimum;     // [in / 32, out] (int4 only)
  bool int4, scale_f16, minimum_f16;
  int64_t tokens, in, out_features, group;   // group: input rows per scale row
};

// kLanes scales (or minimums) from an f32 or f16 array, as f32.
inline Lanes Scales(const void* base, int64_t index, bool f16) {
  return f16 ? WidenHalves(static_cast<const _Float16*>(base) + index)
             : LoadLanes(static_cast<const float*>(base) + index);
}

inline float Scalar(const void* base, int64_t index, bool f16) {
  return f16 ? float(static_cast<const _Float16*>(base)[index])
             : static_cast<const float*>(base)[index];
}

// sums[t * stride + c] += x's rows t < T times the weights of inputs [i, i + kChunk) (fewer
// at the end of a per-channel int8 weight) and columns [o, o + kLanes NV), c counted from o: the
// weights converted in registers (an int4 byte's low and high nibbles in sums of their own),
// then scaled once for the chunk.
template <int T, int NV, bool kInt4>
void Chunk(const Problem& p, const float* x, const float* x_sums, int64_t i, int64_t o,
           float* sums, int64_t stride) {
  const int64_t n = p.out_features, scale_row = i / p.group;
  Lanes low[T][NV] = {}, high[T][NV] = {};
  if constexpr (kInt4) {
    const uint8_t* rows = static_cast<const uint8_t*>(p.weight) + (i / 2) * n + o;
    for (int64_t j = 0; j < kChunk / 2; ++j) {
      __builtin_prefetch(rows + (j + kAhead * kChunk / 2) * n);
      for (int v = 0; v < NV; ++v) {
        const Ints bytes = WidenUnsigned(rows + j * n + kLanes * v);
        const Lanes lo = ToFloats(bytes & 15), hi = ToFloats(bytes >> 4);
        for (int t = 0; t < T; ++t) {
          low[t][v] += x[t * p.in + i + j] * lo;
          high[t][v] += x[t * p.in + i + kChunk / 2 + j] * hi;
        }
      }
    }
  } else {
    const int8_t* q = static_cast<const int8_t*>(p.weight) + o;
    const int64_t end = std::min(i + kChunk, p.in);
    for (int64_t k = i; k < end; ++k) {
      __builtin_prefetch(q + (k + kAhead * kChunk) * n);
      for (int v = 0; v < NV; ++v) {
        const Lanes w = ToFloats(WidenSigned(q + k * n + kLanes * v));
        for (int t = 0; t < T; ++t) low[t][v] += x[t * p.in + k] * w;
      }
    }
  }
  for (int v = 0; v < NV; ++v) {
    const Lanes s = Scales(p.scale, scale_row * n + o + kLanes * v, p.scale_f16);
    Lanes m = {};
    if constexpr (kInt4) m = Scales(p.minimum, scale_row * n + o + kLanes * v, p.minimum_f16);
    for (int t = 0; t < T; ++t) {
      float* into = sums + t * stride + kLanes * v;
      Lanes add = s * (low[t][v] + high[t][v]);
      if constexpr (kInt4) add += m * x_sums[t * (p.in / kChunk) + i / kChunk];
      const Lanes total = LoadLanes(into) + add;
      std::memcpy(into, &total, sizeof total);
    }
  }
}

// The same for one column o and one row t of x: the columns after the last whole vector.
float ChunkColumn(const Problem& p, int64_t t, int64_t i, int64_t o) {
  const int64_t n = p.out_features, end = std::min(i + kChunk, p.in);
  float sum = 0.0f;
  for (int64_t k = i; k < end; ++k) {
    float q;
    if (p.int4) {
      const uint8_t byte = static_cast<const uint8_t*>(p.weight)[(i / 2 + (k - i) % 16) * n + o];
      q = float(k - i < kChunk / 2 ? byte & 15 : byte >> 4);
    } else {
      q = float(static_cast<const int8_t*>(p.weight)[k * n + o]);
    }
    sum += p.x[t * p.in + k] * q;
  }
  float total = Scalar(p.scale, (i / p.group) * n + o, p.scale_f16) * sum;
  if (p.int4) {
    total += Scalar(p.minimum, (i / kChunk) * n + o, p.minimum_f16) *
             p.x_sums[t * (p.in / kChunk) + i / kChunk];
  }
  return total;
}

// sums[t * width + c] += rows [t0, t0 + T) of x times inputs [first_in, end_in) of columns
// [first, first + width): chunk by chunk (each reads a contiguous run of the weight's rows),
// in blocks of kLanes NV columns, then of kLanes, then one column at a time.
template <int T, bool kInt4>
void Rows(const Problem& p, int64_t t0, int64_t first_in, int64_t end_in, int64_t first,
          int64_t width, float* sums) {
  constexpr int NV = VecsFor(T, kInt4);
  const float* x = p.x + t0 * p.in;
  const float* x_sums = kInt4 ? p.x_sums + t0 * (p.in / kChunk) : nullptr;
  for (int64_t i = first_in; i < end_in; i += kChunk) {
    int64_t c = 0;
    for (; c + kLanes * NV <= width; c += kLanes * NV) {
      Chunk<T, NV, kInt4>(p, x, x_sums, i, first + c, sums + c, width);
    }
    for (; c + kLanes <= width; c += kLanes) {
      Chunk<T, 1, kInt4>(p, x, x_sums, i, first + c, sums + c, width);
    }
    for (; c < width; ++c) {
      for (int t = 0; t < T; ++t) sums[t * width + c] += ChunkColumn(p, t0 + t, i, first + c);
    }
  }
}

// One work item: columns [first, first + width) over inputs [first_in, end_in), for every row
// of x, into sums [T, width] (zeroed here).
template <bool kInt4>
void Item(const Problem& p, int64_t first_in, int64_t end_in, int64_t first, int64_t width,
          float* sums) {
  std::fill(sums, sums + p.tokens * width, 0.0f);
  int64_t t = 0;
  for (; t + kMaxRows <= p.tokens; t += kMaxRows) {
    Rows<kMaxRows, kInt4>(p, t, first_in, end_in, first, width, sums + t * width);
  }
  float* rest = sums + t * width;
  switch (p.tokens - t) {
    case 1: Rows<1, kInt4>(p, t, first_in, end_in, first, width, rest); break;
    case 2: Rows<2, kInt4>(p, t, first_in, end_in, first, width, rest); break;
    case 3: Rows<3, kInt4>(p, t, first_in, end_in, first, width, rest); break;
    default: break;
  }
}

bool IsScale(ffi::DataType t) { return t == ffi::DataType::F32 || t == ffi::DataType::F16; }

ffi::Error QuantizedMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer weight,
                           ffi::AnyBuffer scale, ffi::AnyBuffer minimum,
                           ffi::Buffer<ffi::S32> layer_index,
                           ffi::Result<ffi::Buffer<ffi::F32>> out) {
  auto x_dims = x.dimensions();
  const ember_cpu::Matrix w = ember_cpu::MatrixOf(weight), s = ember_cpu::MatrixOf(scale),
                          m = ember_cpu::MatrixOf(minimum);
  const bool int4 = weight.element_type() == ffi::DataType::U8;
  const int64_t in = x_dims.size() == 2 ? x_dims[1] : -1;
  const int64_t out_features = w.cols;
  const bool shapes_ok =
      x_dims.size() == 2 && w.layers > 0 && s.layers == w.layers && s.rows > 0 &&
      s.cols == out_features && in % s.rows == 0 && IsScale(scale.element_type()) &&
      layer_index.element_count() == 1 &&
      (int4 ? (w.rows * 2 == in && s.rows * kChunk == in && IsScale(minimum.element_type()) &&
               m.layers == s.layers && m.rows == s.rows && m.cols == s.cols)
            : (weight.element_type() == ffi::DataType::S8 && w.rows == in));
  if (!shapes_ok) {
    return ffi::Error::InvalidArgument("ember_quantized_matmul: unexpected shapes or dtypes "
                                       "(models/quantization.py checks them)");
  }
  const int64_t layer = ember_cpu::LayerOf(layer_index, w);
  const int64_t rows = s.rows;
  const int64_t tokens = x_dims[0], chunks = (in + kChunk - 1) / kChunk;
  if (tokens == 0 || out_features == 0) return ffi::Error::Success();
  std::vector<float> x_sums(int4 ? tokens * chunks : 0, 0.0f);
  for (int64_t t = 0; int4 && t < tokens; ++t) {
    for (int64_t i = 0; i < in; ++i) x_sums[t * chunks + i / kChunk] += x.typed_data()[t * in + i];
  }
  const Problem p{x.typed_data(), x_sums.data(), ember_cpu::LayerData(weight, w, layer),
                  ember_cpu::LayerData(scale, s, layer),
                  int4 ? ember_cpu::LayerData(minimum, m, layer) : nullptr, int4,
                  scale.element_type() == ffi::DataType::F16,
                  minimum.element_type() == ffi::DataType::F16, tokens, in, out_features,
                  in / rows};
  // Work items: panels of columns, each split along the inputs where there are too few panels
  // to keep every thread busy; the splits' partial sums are added up after.
  const int64_t helpers = ember_cpu::HelpersFor(
      tokens * (weight.size_bytes() / w.layers + 2 * scale.size_bytes() / s.layers));
  const int64_t threads =
      std::clamp<int64_t>(helpers + 1, 1, std::max<int64_t>(1, pool.num_threads()));
  const int64_t panels = (out_features + kPanel - 1) / kPanel;
  const int64_t width = (out_features + panels - 1) / panels;
  const int64_t splits = std::clamp<int64_t>(2 * threads / panels, 1, chunks);
  const int64_t chunks_per_split = (chunks + splits - 1) / splits;
  std::vector<float> partial(panels * splits * tokens * width);
  ember_cpu::ForEachItem(pool, panels * splits, [&](int64_t item) {
    const int64_t panel = item / splits, split = item % splits;
    const int64_t first = panel * width, cols = std::min(width, out_features - first);
    const int64_t first_in = std::min(in, split * chunks_per_split * kChunk);
    const int64_t end_in = std::min(in, first_in + chunks_per_split * kChunk);
    float* sums = partial.data() + item * tokens * width;
    if (int4) {
      Item<true>(p, first_in, end_in, first, cols, sums);
    } else {
      Item<false>(p, first_in, end_in, first, cols, sums);
    }
  }, helpers);
  ember_cpu::AddSplits(partial.data(), panels, splits, tokens, width, out_features,
                       out->typed_data());
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(EmberQuantizedMatmul, QuantizedMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()    // x
                                  .Arg<ffi::AnyBuffer>()           // q or packed
                                  .Arg<ffi::AnyBuffer>()           // scale
                                  .Arg<ffi::AnyBuffer>()           // minimum (or a dummy)
                                  .Arg<ffi::Buffer<ffi::S32>>()    // layer (of stacked ones)
                                  .Ret<ffi::Buffer<ffi::F32>>());  // out
