// AVX2 + FMA inner loops of the BinaryMixedLinear table kernel. Built with -mavx2 -mfma;
// only called when the CPU has them. A 16-entry fp32 table takes two ymm registers: each
// 8-row half of a block looks both up with vpermps (low 3 bits of the index) and picks one
// with vblendvps on bit 3 of the index, moved to the sign bit.
#include "binary_mixed_linear/bml_cpu_kernels.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

namespace qexport {
namespace bml {
namespace detail {
namespace {

#include "binary_mixed_linear/bml_cpu_kernels_common.inc"

inline __m256 Lookup(__m256 t0, __m256 t1, __m256i idx, __m256i bit3_to_sign) {
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(t0, idx), _mm256_permutevar8x32_ps(t1, idx),
                          _mm256_castsi256_ps(bit3_to_sign));
}

template <int NB>
inline void LutDotN(const uint8_t* w, int64_t blk_stride, const float* lut, int64_t nbytes,
                    float* out, const float* scale) {
  __m256 acc[NB][2];
  for (int i = 0; i < NB; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nbytes; ++b) {
    const float* t = lut + 32 * b;
    const __m256 lo0 = _mm256_loadu_ps(t), lo1 = _mm256_loadu_ps(t + 8);
    const __m256 hi0 = _mm256_loadu_ps(t + 16), hi1 = _mm256_loadu_ps(t + 24);
    for (int i = 0; i < NB; ++i) {
      const uint8_t* p = w + i * blk_stride + 16 * b;
      for (int h = 0; h < 2; ++h) {
        const __m256i v =
            _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8 * h)));
        const __m256 a = Lookup(lo0, lo1, v, _mm256_slli_epi32(v, 28));
        const __m256 c = Lookup(hi0, hi1, _mm256_srli_epi32(v, 4), _mm256_slli_epi32(v, 24));
        acc[i][h] = _mm256_add_ps(acc[i][h], _mm256_add_ps(a, c));
      }
    }
  }
  for (int i = 0; i < NB; ++i) {
    for (int h = 0; h < 2; ++h) {
      float* o = out + kRowBlock * i + 8 * h;
      const __m256 prev = _mm256_loadu_ps(o);
      _mm256_storeu_ps(o, scale ? _mm256_fmadd_ps(_mm256_loadu_ps(scale + kRowBlock * i + 8 * h),
                                                  acc[i][h], prev)
                                : _mm256_add_ps(prev, acc[i][h]));
    }
  }
}

}  // namespace

const CpuKernels* KernelsAvx2() { return &Table(); }

}  // namespace detail
}  // namespace bml
}  // namespace qexport

#endif  // x86-64; elsewhere KernelsAvx2() is a stub in bml_cpu_kernels_portable.cpp
