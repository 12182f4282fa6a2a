// Portable inner loops of the BinaryMixedLinear table kernel (no intrinsics): the path for
// CPUs without AVX2 and the one QEXPORT_CPU_ISA=portable forces. See bml_cpu_kernels.h.
#include "binary_mixed_linear/bml_cpu_kernels.h"

namespace qexport {
namespace bml {
namespace detail {
namespace {

#include "binary_mixed_linear/bml_cpu_kernels_common.inc"

template <int NB>
inline void LutDotN(const uint8_t* w, int64_t blk_stride, const float* lut, int64_t nbytes,
                    float* out, const float* scale) {
  for (int i = 0; i < NB; ++i) {
    const uint8_t* wi = w + i * blk_stride;
    float acc[kRowBlock] = {};
    for (int64_t b = 0; b < nbytes; ++b) {
      const float* lo = lut + 32 * b;
      const float* hi = lo + 16;
      const uint8_t* wb = wi + 16 * b;
      for (int r = 0; r < kRowBlock; ++r) acc[r] += lo[wb[r] & 15] + hi[wb[r] >> 4];
    }
    float* o = out + kRowBlock * i;
    if (scale) {
      const float* sc = scale + kRowBlock * i;
      for (int r = 0; r < kRowBlock; ++r) o[r] += sc[r] * acc[r];
    } else {
      for (int r = 0; r < kRowBlock; ++r) o[r] += acc[r];
    }
  }
}

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
