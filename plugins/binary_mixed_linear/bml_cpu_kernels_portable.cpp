// Portable inner loops of the BinaryMixedLinear kernel (no intrinsics): the path for CPUs
// without AVX2 and the one QEXPORT_CPU_ISA=portable forces. See bml_cpu_kernels.h. Tables
// only: a plain-C++ GEMM (the compiler's vectorization of it) measured 3-5x slower than the
// scalar lookups at every M here, so this path has no large-M GEMM.
#include "binary_mixed_linear/bml_cpu_kernels.h"

#include <cstring>

namespace qexport {
namespace bml {
namespace detail {
namespace {

constexpr int kLutMaxBlocks = kGroupBlocks;
constexpr int64_t kLutDwFloats = 16 * kNibbles;  // fp32 tables
constexpr bool kByteMajor = false;

template <int NB>
inline void LutDotN(const uint8_t* w, int64_t line_bytes, const float* lut, int64_t ndw,
                    float* out, const float* scale, float tscale) {
  for (int i = 0; i < NB; ++i) {
    float acc[kRowBlock] = {};
    for (int64_t q = 0; q < ndw; ++q) {
      const uint8_t* line = w + q * line_bytes + i * kBlockLine;
      const float* t = lut + 16 * kNibbles * q;
      // Byte e of a dword holds nibbles 2e (low) and 2e + 1 (high).
      for (int e = 0; e < 4; ++e) {
        const float* lo = t + 32 * e;
        const float* hi = lo + 16;
        for (int r = 0; r < kRowBlock; ++r) {
          const uint8_t b = line[4 * r + e];
          acc[r] += lo[b & 15] + hi[b >> 4];
        }
      }
    }
    float* o = out + kRowBlock * i;
    for (int r = 0; r < kRowBlock; ++r)
      o[r] += (scale ? scale[kRowBlock * i + r] : 1.0f) * (tscale * acc[r]);
  }
}

#include "binary_mixed_linear/bml_cpu_kernels_common.inc"

}  // namespace

const CpuKernels& KernelsPortable() { return Table(); }

#if !defined(__x86_64__) && !defined(_M_X64)
// The AVX files compile to nothing off x86-64.
const CpuKernels* KernelsAvx2() { return nullptr; }
const CpuKernels* KernelsAvx512() { return nullptr; }
#endif

}  // namespace detail
}  // namespace bml
}  // namespace qexport
