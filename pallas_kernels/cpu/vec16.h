// Vectors shared by the CPU kernels in this folder.
//
// Vec: 16 floats, one AVX-512 register, two AVX ones, four of SSE or NEON, whatever
// -march=native gives the compiler. Lanes: the target's own register of floats (kLanes of
// them). Where a Vec is wider than a register, GCC keeps it in memory between operations
// (it has no machine mode for it): a loop that carries many of them, a matmul tile's
// accumulators, runs several times slower than with Lanes (docs/perf.md, an AVX2 machine),
// so such loops use Lanes.

#ifndef EMBER_PALLAS_KERNELS_CPU_VEC16_H_
#define EMBER_PALLAS_KERNELS_CPU_VEC16_H_

#include <cstring>

namespace ember_cpu {

typedef float Vec __attribute__((vector_size(64)));

#if defined(__AVX512F__)
constexpr int kLanes = 16;
#elif defined(__AVX__)
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;
#endif
typedef float Lanes __attribute__((vector_size(4 * kLanes)));

// 16 floats from any address (no alignment asked).
inline Vec LoadVec(const float* from) {
  Vec v;
  std::memcpy(&v, from, sizeof v);
  return v;
}

// kLanes floats from any address.
inline Lanes LoadLanes(const float* from) {
  Lanes v;
  std::memcpy(&v, from, sizeof v);
  return v;
}

}  // namespace ember_cpu

#endif  // EMBER_PALLAS_KERNELS_CPU_VEC16_H_
