// A weight operand of the CPU kernels in this folder: one matrix [rows, cols], or a stack of
// them [layers, rows, cols] and the index of the layer a call takes. Scanned layers hand the
// kernels their whole stacked weights and the layer's index, so that no layer's weights are
// copied out of the stack each step (models/layer_slice.py).

#ifndef EMBER_PALLAS_KERNELS_CPU_LAYER_STACK_H_
#define EMBER_PALLAS_KERNELS_CPU_LAYER_STACK_H_

#include <algorithm>
#include <cstdint>

#include "xla/ffi/api/ffi.h"

namespace ember_cpu {

struct Matrix {
  int64_t layers = 0, rows = 0, cols = 0;   // layers 0: neither a matrix nor a stack

  int64_t size() const { return rows * cols; }
};

inline Matrix MatrixOf(const xla::ffi::AnyBuffer& buffer) {
  auto d = buffer.dimensions();
  if (d.size() == 2) return {1, d[0], d[1]};
  if (d.size() == 3) return {d[0], d[1], d[2]};
  return {};
}

// The layer a call takes: layer[0] clipped into the stack.
inline int64_t LayerOf(const xla::ffi::Buffer<xla::ffi::DataType::S32>& layer,
                       const Matrix& m) {
  return std::clamp<int64_t>(layer.typed_data()[0], 0, std::max<int64_t>(m.layers - 1, 0));
}

// Layer `layer`'s first byte (the one matrix's, unstacked).
inline const void* LayerData(const xla::ffi::AnyBuffer& buffer, const Matrix& m,
                             int64_t layer) {
  return static_cast<const char*>(buffer.untyped_data()) +
         layer * static_cast<int64_t>(buffer.size_bytes()) / std::max<int64_t>(m.layers, 1);
}

}  // namespace ember_cpu

#endif  // EMBER_PALLAS_KERNELS_CPU_LAYER_STACK_H_
