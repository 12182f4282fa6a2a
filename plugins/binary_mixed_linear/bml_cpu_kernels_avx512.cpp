// AVX-512 (F/BW/VL) inner loops of the BinaryMixedLinear table kernel. Built with
// -mavx512f -mavx512bw -mavx512vl -mfma; only called when the CPU has them.
// A 16-entry fp32 table fills one zmm register, so one vpermps looks up 16 output rows at
// once: a 16-byte load of weight bytes (16 rows x 2 nibbles), widened to 16 dwords, indexes
// the low-nibble table directly (vpermps reads the low 4 bits) and, shifted by 4, the
// high-nibble one.
#include "binary_mixed_linear/bml_cpu_kernels.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

namespace qexport {
namespace bml {
namespace detail {
namespace {

#include "binary_mixed_linear/bml_cpu_kernels_common.inc"

template <int NB>
inline void LutDotN(const uint8_t* w, int64_t blk_stride, const float* lut, int64_t nbytes,
                    float* out, const float* scale) {
  __m512 lo_acc[NB], hi_acc[NB];
  for (int i = 0; i < NB; ++i) lo_acc[i] = hi_acc[i] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nbytes; ++b) {
    const __m512 tlo = _mm512_loadu_ps(lut + 32 * b);
    const __m512 thi = _mm512_loadu_ps(lut + 32 * b + 16);
    for (int i = 0; i < NB; ++i) {
      const __m512i v = _mm512_cvtepu8_epi32(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + i * blk_stride + 16 * b)));
      lo_acc[i] = _mm512_add_ps(lo_acc[i], _mm512_permutexvar_ps(v, tlo));
      hi_acc[i] = _mm512_add_ps(hi_acc[i], _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), thi));
    }
  }
  for (int i = 0; i < NB; ++i) {
    const __m512 sum = _mm512_add_ps(lo_acc[i], hi_acc[i]);
    float* o = out + kRowBlock * i;
    const __m512 prev = _mm512_loadu_ps(o);
    _mm512_storeu_ps(o, scale ? _mm512_fmadd_ps(_mm512_loadu_ps(scale + kRowBlock * i), sum, prev)
                              : _mm512_add_ps(prev, sum));
  }
}

}  // namespace

const CpuKernels* KernelsAvx512() { return &Table(); }

}  // namespace detail
}  // namespace bml
}  // namespace qexport

#endif  // x86-64; elsewhere KernelsAvx512() is a stub in bml_cpu_kernels_portable.cpp
