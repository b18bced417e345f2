// x @ w for a few rows of x and an int8 or int4 weight, on the CPU, through the XLA FFI.
//
// Layouts are models/quantization.py's: Int8Weight q i8[in, out] with scale f32|f16[in / group,
// out] (w = q * scale); Int4Weight packed u8[in / 2, out] (for group g and j < 16, packed[16g + j]
// holds q[32g + j] in its low nibble and q[32g + 16 + j] in its high one) with scale and minimum
// f32|f16[in / 32, out] (w = q * scale + minimum). x f32[T, in], out f32[T, out].
//
// Why it exists: XLA's CPU backend never fuses the int-to-float conversion into a dot, so the
// step converts a block of weights to f32 in memory before each small dot (models/quantization.py)
// and a decode reads and writes every weight several times over. Here a group's weights are
// converted in registers and folded into per-group sums: sum_i x_i (q_i s + m) =
// s sum_i x_i q_i + m sum_i x_i. Columns of out are split over XLA's intra-op thread pool.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "for_each_item.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Columns of out per work item: long runs of each weight row (contiguous bytes, which the
// hardware prefetches), and a few items per thread.
int64_t ColumnsPerItem(int64_t out_features, int64_t threads) {
  const int64_t wanted = (out_features + 4 * threads - 1) / (4 * threads);
  return std::clamp<int64_t>((wanted + 63) / 64 * 64, 64, 2048);
}
constexpr int64_t kGroup = 32;

struct Problem {
  const float* x;          // [T, in]
  float* out;              // [T, out]
  const void* weight;      // i8[in, out] or u8[in / 2, out]
  const void* scale;       // [rows, out]
  const void* minimum;     // [in / 32, out] (int4 only)
  bool int4, scale_f16, minimum_f16;
  int64_t tokens, in, out_features, group;   // group: input rows per scale row
};

inline float Scalar(const void* base, int64_t index, bool f16) {
  return f16 ? float(static_cast<const _Float16*>(base)[index])
             : static_cast<const float*>(base)[index];
}

// out[:, first:first + width] for every token.
void Columns(const Problem& p, int64_t first, int64_t width, std::vector<float>& part,
             std::vector<float>& total) {
  const int64_t n = p.out_features, t_count = p.tokens;
  part.assign(t_count * width, 0.0f);
  total.assign(t_count * width, 0.0f);
  const int64_t groups = p.in / p.group;
  for (int64_t g = 0; g < groups; ++g) {
    std::fill(part.begin(), part.end(), 0.0f);
    if (p.int4) {
      const uint8_t* packed = static_cast<const uint8_t*>(p.weight);
      for (int64_t j = 0; j < kGroup / 2; ++j) {
        const uint8_t* row = packed + (g * (kGroup / 2) + j) * n + first;
        for (int64_t t = 0; t < t_count; ++t) {
          const float x_low = p.x[t * p.in + g * kGroup + j];
          const float x_high = p.x[t * p.in + g * kGroup + kGroup / 2 + j];
          float* sums = &part[t * width];
#pragma omp simd
          for (int64_t o = 0; o < width; ++o) {
            sums[o] += x_low * float(row[o] & 15) + x_high * float(row[o] >> 4);
          }
        }
      }
    } else {
      const int8_t* q = static_cast<const int8_t*>(p.weight);
      for (int64_t i = g * p.group; i < (g + 1) * p.group; ++i) {
        const int8_t* row = q + i * n + first;
        for (int64_t t = 0; t < t_count; ++t) {
          const float x_i = p.x[t * p.in + i];
          float* sums = &part[t * width];
#pragma omp simd
          for (int64_t o = 0; o < width; ++o) sums[o] += x_i * float(row[o]);
        }
      }
    }
    for (int64_t t = 0; t < t_count; ++t) {
      float x_sum = 0.0f;
      if (p.int4) {
        for (int64_t i = g * kGroup; i < (g + 1) * kGroup; ++i) x_sum += p.x[t * p.in + i];
      }
      const float* sums = &part[t * width];
      float* into = &total[t * width];
      for (int64_t o = 0; o < width; ++o) {
        const int64_t at = g * n + first + o;
        float value = Scalar(p.scale, at, p.scale_f16) * sums[o];
        if (p.int4) value += Scalar(p.minimum, at, p.minimum_f16) * x_sum;
        into[o] += value;
      }
    }
  }
  for (int64_t t = 0; t < t_count; ++t) {
    std::memcpy(p.out + t * n + first, &total[t * width], width * sizeof(float));
  }
}

bool IsScale(ffi::DataType t) { return t == ffi::DataType::F32 || t == ffi::DataType::F16; }

ffi::Error QuantizedMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer weight,
                           ffi::AnyBuffer scale, ffi::AnyBuffer minimum,
                           ffi::Result<ffi::Buffer<ffi::F32>> out) {
  auto x_dims = x.dimensions();
  auto w_dims = weight.dimensions();
  auto s_dims = scale.dimensions();
  const bool int4 = weight.element_type() == ffi::DataType::U8;
  const int64_t in = x_dims.size() == 2 ? x_dims[1] : -1;
  const int64_t out_features = w_dims.size() == 2 ? w_dims[1] : -1;
  const int64_t rows = s_dims.size() == 2 ? s_dims[0] : 0;
  const bool shapes_ok =
      x_dims.size() == 2 && w_dims.size() == 2 && s_dims.size() == 2 && rows > 0 &&
      s_dims[1] == out_features && in % rows == 0 && IsScale(scale.element_type()) &&
      (int4 ? (w_dims[0] * 2 == in && rows * kGroup == in && IsScale(minimum.element_type()) &&
               minimum.element_count() == scale.element_count())
            : (weight.element_type() == ffi::DataType::S8 && w_dims[0] == in));
  if (!shapes_ok) {
    return ffi::Error::InvalidArgument("ember_quantized_matmul: unexpected shapes or dtypes "
                                       "(models/quantization.py checks them)");
  }
  const Problem p{x.typed_data(), out->typed_data(), weight.untyped_data(),
                  scale.untyped_data(), minimum.untyped_data(), int4,
                  scale.element_type() == ffi::DataType::F16,
                  minimum.element_type() == ffi::DataType::F16, x_dims[0], in, out_features,
                  in / rows};
  const int64_t columns =
      ColumnsPerItem(out_features, std::max<int64_t>(1, pool.num_threads()));
  ember_cpu::ForEachItem(pool, (out_features + columns - 1) / columns, [&](int64_t i) {
    thread_local std::vector<float> part, sums;
    const int64_t first = i * columns;
    Columns(p, first, std::min(columns, out_features - first), part, sums);
  });
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
                                  .Ret<ffi::Buffer<ffi::F32>>());  // out
