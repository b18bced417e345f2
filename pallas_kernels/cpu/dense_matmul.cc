// x @ w for f32 x [T, in] and w [in, out] on the CPU, through the XLA FFI, computing only the
// step's real rows: rows >= num_rows[0] of the result are zeros.
//
// Why it exists: a step's token count is padded to a rung of the runner's ladder (a decode of
// 40 sequences runs 64 rows), and XLA's dot computes every padded row. Here the real row count
// is an operand, read at run time, so the padding costs nothing and the ladder no compiles.
// Without it XLA's CPU dots (YNNPACK, which also repacks the weights on every call) are neither
// faster nor slower than this kernel on full rungs (docs/perf.md). Up to kFewRows real rows
// (a decode of a few sequences) the product is bound by reading the weight: FewRows reads it
// in long runs, faster than XLA's dot (0.64-0.89x its time at 1 to 8 rows on the
// bench_offline model's shapes, 2026-11-30), and a scanned layer's weight in place, where
// XLA's dot would copy it out of its stack first.
//
// The product is blocked for registers: a tile of kRows rows by kVecs vectors of kLanes columns
// accumulates over a block of kDepth inputs, broadcasting one x value to each row's FMAs. A
// block the caches hold badly in place (Packs) is first copied to contiguous rows in L1.
// Work items are column panels (and, where there are few, row groups) on XLA's intra-op
// thread pool, or (FewRows) panels split along the inputs (for_each_item.h picks the threads).

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>

#include "for_each_item.h"
#include "layer_stack.h"
#include "vec16.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using ember_cpu::kLanes;
using ember_cpu::Lanes;
using ember_cpu::LoadLanes;

// A tile's accumulators (kRows x kVecs registers of kLanes floats) must fit the registers
// beside the weight's kVecs and a broadcast x value: 24 of 32 with AVX-512, 12 of 16 with AVX,
// 8 of 16 (SSE) or 32 (NEON) otherwise.
#if defined(__AVX512F__)
constexpr int kRows = 6, kVecs = 4;
#elif defined(__AVX__)
constexpr int kRows = 6, kVecs = 2;
#else
constexpr int kRows = 4, kVecs = 2;
#endif
constexpr int64_t kTileCols = kLanes * kVecs;
constexpr int64_t kDepth = 512;        // inputs per pass over a tile (x's rows stay in L1)
constexpr int64_t kPackedDepth = 128;  // the same, for a packed block (32 KiB with AVX-512: L1)
constexpr int64_t kPackRows = 8 * kRows;   // rows from which a block is always packed
constexpr int64_t kItemsPerThread = 4;
constexpr int64_t kFewRows = 8;        // rows up to which FewRows reads the weight
constexpr int64_t kFewSums = 16 << 10;   // bytes of a FewRows item's sums (R x panel: in L1)
constexpr int64_t kFewItemsPerThread = 2;
constexpr int kFewStep = 8;            // weight rows FewRows reads at a time

struct Problem {
  const float* x;   // [T, in]
  const float* w;   // [in, out]
  float* y;         // [T, out]
  int64_t in, out;
};

// The block of the weight a thread is likely to take next: its first tile prefetches it into
// L2 (rows k < depth at first + k * out, kLanes NV columns), so that the block after reads it from
// the cache instead of waiting on memory (docs/perf.md).
struct NextBlock {
  const float* first = nullptr;
  int64_t depth = 0;
};

// y[r, c] (+)= sum over k < depth of x[r, k] w[k, c], for r < MR and kLanes NV columns c, the
// pointers at the block's first row, input and column; `next` prefetched along the way.
template <int MR, int NV, bool kPrefetch>
void Tile(const Problem& p, const float* x, const float* w, int64_t w_stride, float* y,
          int64_t depth, bool add, NextBlock next) {
  Lanes acc[MR][NV];
  for (int r = 0; r < MR; ++r) {
    for (int v = 0; v < NV; ++v) acc[r][v] = add ? LoadLanes(y + r * p.out + kLanes * v) : Lanes{};
  }
  for (int64_t k = 0; k < depth; ++k) {
    if (kPrefetch && k < next.depth) {
      for (int v = 0; v < NV; ++v) __builtin_prefetch(next.first + k * p.out + kLanes * v, 0, 2);
    }
    Lanes b[NV];
    for (int v = 0; v < NV; ++v) b[v] = LoadLanes(w + k * w_stride + kLanes * v);
    for (int r = 0; r < MR; ++r) {
      const float a = x[r * p.in + k];
      for (int v = 0; v < NV; ++v) acc[r][v] += a * b[v];
    }
  }
  for (int r = 0; r < MR; ++r) std::memcpy(y + r * p.out, acc[r], sizeof acc[r]);
}

// Tiles of up to kRows rows over rows [0, rows) of the block, the first prefetching `next`
// where kPrefetch (an instance of its own: the narrow last columns' tiles take none); the
// block's weight rows w_stride floats apart (p.out, or kTileCols where packed).
template <int NV, bool kPrefetch = false>
void Rows(const Problem& p, const float* x, const float* w, int64_t w_stride, float* y,
          int64_t rows, int64_t depth, bool add, NextBlock next = {}) {
  int64_t r = 0;
  for (; r + kRows <= rows; r += kRows) {
    Tile<kRows, NV, kPrefetch>(p, x + r * p.in, w, w_stride, y + r * p.out, depth, add,
                               r == 0 ? next : NextBlock{});
  }
  const float* xr = x + r * p.in;
  float* yr = y + r * p.out;
  if (r > 0) next = {};
  switch (rows - r) {   // the last few rows
    case 1: Tile<1, NV, kPrefetch>(p, xr, w, w_stride, yr, depth, add, next); break;
    case 2: Tile<2, NV, kPrefetch>(p, xr, w, w_stride, yr, depth, add, next); break;
    case 3: Tile<3, NV, kPrefetch>(p, xr, w, w_stride, yr, depth, add, next); break;
    case 4: Tile<4 < kRows ? 4 : 1, NV, kPrefetch>(p, xr, w, w_stride, yr, depth, add, next); break;
    case 5: Tile<5 < kRows ? 5 : 1, NV, kPrefetch>(p, xr, w, w_stride, yr, depth, add, next); break;
    default: break;
  }
}

// A few rows (a decode of a few sequences): a tile's pass over kDepth inputs for kTileCols
// columns would read the weight in runs of kTileCols floats, one per input row, at a fraction
// of the memory's speed. Instead a work item takes a panel of columns and a range of inputs
// [begin, end) and reads the weight's rows across the whole panel, eight at a time (eight
// streams in flight: four read ~10% slower), into the rows' partial sums (sums[r * stride + c]
// for the panel's `width` columns: in L1).
template <int R>
void FewRows(const Problem& p, int64_t begin, int64_t end, int64_t first, int64_t width,
             float* sums, int64_t stride) {
  for (int r = 0; r < R; ++r) std::fill(sums + r * stride, sums + r * stride + width, 0.0f);
  const int64_t vectors = width / kLanes;
  constexpr int kStep = kFewStep;
  int64_t k = begin;
  for (; k + kStep <= end; k += kStep) {
    const float* w = p.w + k * p.out + first;
    float a[R][kStep];
    for (int r = 0; r < R; ++r) {
      for (int j = 0; j < kStep; ++j) a[r][j] = p.x[r * p.in + k + j];
    }
    for (int64_t v = 0; v < vectors; ++v) {
      Lanes b[kStep];
      for (int j = 0; j < kStep; ++j) b[j] = LoadLanes(w + j * p.out + kLanes * v);
      for (int r = 0; r < R; ++r) {
        Lanes sum = LoadLanes(sums + r * stride + kLanes * v);
        for (int j = 0; j < kStep; ++j) sum += a[r][j] * b[j];
        std::memcpy(sums + r * stride + kLanes * v, &sum, sizeof sum);
      }
    }
    for (int64_t c = kLanes * vectors; c < width; ++c) {   // the last (width % kLanes) columns
      for (int r = 0; r < R; ++r) {
        for (int j = 0; j < kStep; ++j) sums[r * stride + c] += a[r][j] * w[j * p.out + c];
      }
    }
  }
  for (; k < end; ++k) {   // the last (end - begin) % kStep inputs
    const float* w = p.w + k * p.out + first;
    for (int r = 0; r < R; ++r) {
      const float a = p.x[r * p.in + k];
      for (int64_t c = 0; c < width; ++c) sums[r * stride + c] += a * w[c];
    }
  }
}

void FewRowsOf(int64_t rows, const Problem& p, int64_t begin, int64_t end, int64_t first,
               int64_t width, float* sums, int64_t stride) {
  switch (rows) {
    case 1: FewRows<1>(p, begin, end, first, width, sums, stride); break;
    case 2: FewRows<2>(p, begin, end, first, width, sums, stride); break;
    case 3: FewRows<3>(p, begin, end, first, width, sums, stride); break;
    case 4: FewRows<4>(p, begin, end, first, width, sums, stride); break;
    case 5: FewRows<5>(p, begin, end, first, width, sums, stride); break;
    case 6: FewRows<6>(p, begin, end, first, width, sums, stride); break;
    case 7: FewRows<7>(p, begin, end, first, width, sums, stride); break;
    default: FewRows<8>(p, begin, end, first, width, sums, stride); break;
  }
}

// Whether a product's blocks are copied to a buffer of their own (`packed`, below) before
// their tiles read them. A block's weight rows lie p.out floats apart; where that stride is a
// multiple of 4 KiB (an output width that is a multiple of 1024: a Llama's hidden size,
// intermediate size or vocabulary) they all fall in a few of the caches' sets, which then
// hold a small part of the block, and every tile reads it from farther away: packed, the same
// products ran 1.3-1.9x faster (docs/perf.md). Other widths gain only where a block serves
// many tiles (kPackRows rows), and the copy costs more than it saves for fewer.
bool Packs(const Problem& p, int64_t rows) {
  return rows >= kPackRows || (p.out * sizeof(float)) % 4096 == 0;
}

// Columns [first, first + width) of rows [first_row, first_row + rows): kTileCols columns at
// a time, then kLanes, then the last (width % kLanes) one by one. Each block of depth inputs
// prefetches the next one's, and the last the first block of the columns at `later` (the panel
// this thread is likely to take next; none where null). Where `pack`, each kTileCols-wide
// block is first copied into `packed` (kPackedDepth x kTileCols floats, in L1), its rows
// contiguous.
void Block(const Problem& p, int64_t first_row, int64_t rows, int64_t first, int64_t width,
           const float* later, bool pack) {
  const int64_t block_depth = pack ? kPackedDepth : kDepth;
  alignas(64) float packed[kPackedDepth * kTileCols];   // 32 KiB of stack (AVX-512)
  for (int64_t k0 = 0; k0 < p.in; k0 += block_depth) {
    const int64_t depth = std::min(block_depth, p.in - k0);
    const bool add = k0 > 0;
    const float* x = p.x + first_row * p.in + k0;
    int64_t c = first;
    for (; c + kTileCols <= first + width; c += kTileCols) {
      NextBlock next;
      if (k0 + block_depth < p.in) {
        next = {p.w + (k0 + block_depth) * p.out + c,
                std::min(block_depth, p.in - k0 - block_depth)};
      } else if (later) {
        next = {later + (c - first), std::min(block_depth, p.in)};
      }
      const float* w = p.w + k0 * p.out + c;
      int64_t w_stride = p.out;
      if (pack) {
        for (int64_t k = 0; k < depth; ++k) {
          std::memcpy(packed + k * kTileCols, w + k * p.out, sizeof(float) * kTileCols);
        }
        w = packed;
        w_stride = kTileCols;
      }
      Rows<kVecs, true>(p, x, w, w_stride, p.y + first_row * p.out + c, rows, depth, add, next);
    }
    for (; c + kLanes <= first + width; c += kLanes) {
      Rows<1>(p, x, p.w + k0 * p.out + c, p.out, p.y + first_row * p.out + c, rows, depth, add);
    }
    for (; c < first + width; ++c) {
      for (int64_t r = 0; r < rows; ++r) {
        float sum = add ? p.y[(first_row + r) * p.out + c] : 0.0f;
        for (int64_t k = k0; k < k0 + depth; ++k) {
          sum += p.x[(first_row + r) * p.in + k] * p.w[k * p.out + c];
        }
        p.y[(first_row + r) * p.out + c] = sum;
      }
    }
  }
}

ffi::Error DenseMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w,
                       ffi::Buffer<ffi::S32> num_rows, ffi::Buffer<ffi::S32> layer_index,
                       ffi::Result<ffi::Buffer<ffi::F32>> y) {
  auto x_dims = x.dimensions();
  const ember_cpu::Matrix m = ember_cpu::MatrixOf(w);
  if (x_dims.size() != 2 || m.layers == 0 || x_dims[1] != m.rows ||
      w.element_type() != ffi::DataType::F32 || num_rows.element_count() != 1 ||
      layer_index.element_count() != 1) {
    return ffi::Error::InvalidArgument("ember_dense_matmul: unexpected shapes "
                                       "(models/transformer.py checks them)");
  }
  const Problem p{x.typed_data(),
                  static_cast<const float*>(
                      ember_cpu::LayerData(w, m, ember_cpu::LayerOf(layer_index, m))),
                  y->typed_data(), m.rows, m.cols};
  const int64_t tokens = x_dims[0];
  const int64_t rows = std::clamp<int64_t>(num_rows.typed_data()[0], 0, tokens);
  std::memset(p.y + rows * p.out, 0, (tokens - rows) * p.out * sizeof(float));
  if (rows == 0 || p.out == 0) return ffi::Error::Success();
  if (rows <= kFewRows) {
    // Items: panels of columns, each split along the inputs into enough items for the
    // threads; the splits' partial sums are added up after.
    const int64_t helpers = ember_cpu::HelpersFor(m.size() * sizeof(float));
    const int64_t threads =
        std::clamp<int64_t>(helpers + 1, 1, std::max<int64_t>(1, pool.num_threads()));
    const int64_t widest = kFewSums / (rows * sizeof(float));
    const int64_t panels = (p.out + widest - 1) / widest;
    const int64_t width = ((p.out + panels - 1) / panels + 15) / 16 * 16;
    const int64_t wanted = kFewItemsPerThread * threads;
    const int64_t splits = std::clamp<int64_t>((wanted + panels - 1) / panels, 1,
                                               (p.in + kFewStep - 1) / kFewStep);
    const int64_t per_split =
        ((p.in + splits - 1) / splits + kFewStep - 1) / kFewStep * kFewStep;
    std::unique_ptr<float[]> partial(new float[panels * splits * rows * width]);
    ember_cpu::ForEachItem(pool, panels * splits, [&](int64_t item) {
      const int64_t panel = item / splits, split = item % splits;
      const int64_t first = panel * width, begin = std::min(p.in, split * per_split);
      FewRowsOf(rows, p, begin, std::min(p.in, begin + per_split), first,
                std::min(width, p.out - first), partial.get() + item * rows * width, width);
    }, helpers);
    ember_cpu::AddSplits(partial.get(), panels, splits, rows, width, p.out, p.y);
    return ffi::Error::Success();
  }
  // Panels of whole tiles' columns; row groups of whole tiles' rows when the panels are too
  // few to give every thread kItemsPerThread items.
  const int64_t width = kTileCols;
  const int64_t panels = (p.out + width - 1) / width;
  const int64_t wanted = kItemsPerThread * std::max<int64_t>(1, pool.num_threads());
  const int64_t tiles = (rows + kRows - 1) / kRows;
  const int64_t groups = std::clamp<int64_t>((wanted + panels - 1) / panels, 1, tiles);
  const int64_t group_rows = (tiles + groups - 1) / groups * kRows;
  const int64_t num_groups = (rows + group_rows - 1) / group_rows;
  // Items go to the threads in turn, so a thread's next item is most likely `threads` on.
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const bool pack = Packs(p, rows);
  ember_cpu::ForEachItem(pool, panels * num_groups, [&](int64_t i) {
    const int64_t panel = i / num_groups, group = i % num_groups;
    const int64_t first_row = group * group_rows, first = panel * width;
    const int64_t later_panel = (i + threads) / num_groups;
    const bool later = later_panel != panel && (later_panel + 1) * width <= p.out;
    Block(p, first_row, std::min(group_rows, rows - first_row), first,
          std::min(width, p.out - first), later ? p.w + later_panel * width : nullptr, pack);
  }, ember_cpu::HelpersFor(rows * m.size() * sizeof(float)));
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(EmberDenseMatmul, DenseMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()    // x
                                  .Arg<ffi::AnyBuffer>()           // w
                                  .Arg<ffi::Buffer<ffi::S32>>()    // num_rows
                                  .Arg<ffi::Buffer<ffi::S32>>()    // layer (of stacked ones)
                                  .Ret<ffi::Buffer<ffi::F32>>());  // y
