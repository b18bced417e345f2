// A vector of 16 floats, shared by the CPU kernels in this folder: one AVX-512 register, two
// AVX ones, four of SSE or NEON, whatever -march=native gives the compiler.

#ifndef EMBER_PALLAS_KERNELS_CPU_VEC16_H_
#define EMBER_PALLAS_KERNELS_CPU_VEC16_H_

#include <cstring>

namespace ember_cpu {

typedef float Vec __attribute__((vector_size(64)));

// 16 floats from any address (no alignment asked).
inline Vec LoadVec(const float* from) {
  Vec v;
  std::memcpy(&v, from, sizeof v);
  return v;
}

}  // namespace ember_cpu

#endif  // EMBER_PALLAS_KERNELS_CPU_VEC16_H_
