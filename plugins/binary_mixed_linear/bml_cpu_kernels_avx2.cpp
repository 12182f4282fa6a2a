// AVX2 + FMA inner loops of the BinaryMixedLinear kernel. Built with -mavx2 -mfma; only
// called when the CPU has them. Tables: a 16-entry fp32 table takes two ymm registers: each
// 8-row half of a block looks both up with vpermps (low 3 bits of the index) and picks one
// with vblendvps on bit 3 of the index, moved to the sign bit. GEMM: a 6 x 16 micro-kernel
// (12 ymm accumulators, X broadcast, 2 panel loads per k).
#include "binary_mixed_linear/bml_cpu_kernels.h"

#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include <algorithm>

namespace qexport {
namespace bml {
namespace detail {
namespace {

constexpr int64_t kPrefetchDw = 16;  // as in the AVX-512 file

inline __m256 Lookup(const float* t, __m256i idx, __m256i bit3_to_sign) {
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(t), idx),
                          _mm256_permutevar8x32_ps(_mm256_loadu_ps(t + 8), idx),
                          _mm256_castsi256_ps(bit3_to_sign));
}

constexpr int kLutMaxBlocks = 4;  // 16 ymm registers: half a group at a time
constexpr int64_t kLutDwFloats = 16 * kNibbles;  // fp32 tables

template <int NB>
inline void LutDotN(const uint8_t* w, int64_t line_bytes, const float* lut, int64_t ndw,
                    float* out, const float* scale, float tscale) {
  __m256 acc[NB][2];
  for (int i = 0; i < NB; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
  for (int64_t q = 0; q < ndw; ++q) {
    const uint8_t* line = w + q * line_bytes;
    for (int i = 0; i < NB; ++i)
      _mm_prefetch(reinterpret_cast<const char*>(line + kPrefetchDw * line_bytes + i * kBlockLine),
                   _MM_HINT_T0);
    const float* t = lut + 16 * kNibbles * q;
    for (int i = 0; i < NB; ++i) {
      for (int h = 0; h < 2; ++h) {
        const __m256i v =
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(line + i * kBlockLine + 32 * h));
        for (int j = 0; j < kNibbles; ++j) {
          // Index: nibble j moved down (vpermps reads bits 0..2); selector: its bit 3 moved
          // to bit 31 (vblendvps reads the sign).
          const __m256i idx = j == 0 ? v : _mm256_srli_epi32(v, 4 * j);
          const __m256i sel = j == 7 ? v : _mm256_slli_epi32(v, 28 - 4 * j);
          acc[i][h] = _mm256_add_ps(acc[i][h], Lookup(t + 16 * j, idx, sel));
        }
      }
    }
  }
  const __m256 ts = _mm256_set1_ps(tscale);
  for (int i = 0; i < NB; ++i) {
    for (int h = 0; h < 2; ++h) {
      float* o = out + kRowBlock * i + 8 * h;
      const __m256 prev = _mm256_loadu_ps(o);
      const __m256 sum = _mm256_mul_ps(ts, acc[i][h]);
      _mm256_storeu_ps(o, scale ? _mm256_fmadd_ps(_mm256_loadu_ps(scale + kRowBlock * i + 8 * h),
                                                  sum, prev)
                                : _mm256_add_ps(prev, sum));
    }
  }
}

#define BML_HAS_SIGN_LUT
float SignLut(const float* x, int64_t ndw, float* lut) {
  // Lane i of the low half (entries 0..7): bit t of i ? +1 : -1, t < 3; entry 8 + i adds
  // x3 where entry i subtracts it.
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  __m256 s[3];
  for (int t = 0; t < 3; ++t)
    s[t] = _mm256_blendv_ps(_mm256_set1_ps(-1.0f), _mm256_set1_ps(1.0f),
                            _mm256_castsi256_ps(_mm256_slli_epi32(lane, 31 - t)));
  for (int64_t g = 0; g < kNibbles * ndw; ++g) {
    const float* xg = x + 4 * g;
    __m256 t = _mm256_mul_ps(s[0], _mm256_set1_ps(xg[0]));
    t = _mm256_fmadd_ps(s[1], _mm256_set1_ps(xg[1]), t);
    t = _mm256_fmadd_ps(s[2], _mm256_set1_ps(xg[2]), t);
    const __m256 x3 = _mm256_set1_ps(xg[3]);
    _mm256_storeu_ps(lut + 16 * g, _mm256_sub_ps(t, x3));
    _mm256_storeu_ps(lut + 16 * g + 8, _mm256_add_ps(t, x3));
  }
  return 1.0f;
}

template <bool kR2>
void DequantSignsT(const uint8_t* w, int64_t line_bytes, int64_t kb, const int32_t* chan,
                   const float* r2, const float* pos, const float* neg, float* panel,
                   int64_t ld) {
  const __m256 p0 = _mm256_loadu_ps(pos), p1 = _mm256_loadu_ps(pos + 8);
  const __m256 n0 = _mm256_loadu_ps(neg), n1 = _mm256_loadu_ps(neg + 8);
  for (int64_t c0 = 0; c0 < kb; c0 += 32) {
    const uint8_t* line = w + (c0 / 32) * line_bytes;
    const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(line));
    const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(line + 32));
    const int nt = static_cast<int>(std::min<int64_t>(32, kb - c0));
    for (int t = 0; t < nt; ++t) {
      // Bit t moved to the sign bit selects pos.
      const __m128i sh = _mm_cvtsi32_si128(31 - t);
      __m256 a = _mm256_blendv_ps(n0, p0, _mm256_castsi256_ps(_mm256_sll_epi32(v0, sh)));
      __m256 b = _mm256_blendv_ps(n1, p1, _mm256_castsi256_ps(_mm256_sll_epi32(v1, sh)));
      if (kR2) {
        const __m256 s = _mm256_set1_ps(r2[c0 + t]);
        a = _mm256_mul_ps(a, s);
        b = _mm256_mul_ps(b, s);
      }
      float* dst = panel + chan[c0 + t] * ld;
      _mm256_storeu_ps(dst, a);
      _mm256_storeu_ps(dst + 8, b);
    }
  }
}

void DequantCodes(const uint8_t* w, int64_t line_bytes, int64_t ndw, const int32_t* chan,
                  const float* scale, const float* szero, float* panel, int64_t ld) {
  const __m256 s0 = _mm256_loadu_ps(scale), s1 = _mm256_loadu_ps(scale + 8);
  const __m256 z0 = _mm256_loadu_ps(szero), z1 = _mm256_loadu_ps(szero + 8);
  const __m256i mask = _mm256_set1_epi32(15);
  for (int64_t q = 0; q < ndw; ++q) {
    const uint8_t* line = w + q * line_bytes;
    const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(line));
    const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(line + 32));
    for (int j = 0; j < kNibbles; ++j) {
      const int32_t c = chan[kNibbles * q + j];
      if (c < 0) continue;  // padding slot
      const __m128i sh = _mm_cvtsi32_si128(4 * j);
      const __m256 q0 = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srl_epi32(v0, sh), mask));
      const __m256 q1 = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srl_epi32(v1, sh), mask));
      float* dst = panel + c * ld;
      _mm256_storeu_ps(dst, _mm256_fmsub_ps(s0, q0, z0));
      _mm256_storeu_ps(dst + 8, _mm256_fmsub_ps(s1, q1, z1));
    }
  }
}

#define BML_HAS_GEMM
constexpr int kGemmMr = 6;
constexpr int kGemmNr = 16;
// Fit on Zen 5 run as AVX2 (bml_cpu_kernels.h): the two-register lookups cost 3.7 GEMM
// steps, so the GEMM wins from M ~ 8 on every shape measured.
constexpr GemmCosts kGemmCosts{3.67f, 3.0f, 8.8f, 0.0f, 4.0f, 4};

template <int MR>
inline void GemmTile(const float* a, int64_t lda, const float* b, int64_t k, const float* bias,
                     float* c, int64_t ldc, int cols) {
  // The accumulators stay in registers only if every loop over them is unrolled (else GCC
  // keeps the arrays in memory and stores them on every k: 2x slower).
  __m256 acc0[MR], acc1[MR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) acc0[i] = acc1[i] = _mm256_setzero_ps();
  for (int64_t kk = 0; kk < k; ++kk) {
    const __m256 b0 = _mm256_loadu_ps(b + kGemmNr * kk);
    const __m256 b1 = _mm256_loadu_ps(b + kGemmNr * kk + 8);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m256 av = _mm256_broadcast_ss(a + i * lda + kk);
      acc0[i] = _mm256_fmadd_ps(av, b0, acc0[i]);
      acc1[i] = _mm256_fmadd_ps(av, b1, acc1[i]);
    }
  }
  if (cols == kGemmNr) {
    const __m256 bias0 = bias ? _mm256_loadu_ps(bias) : _mm256_setzero_ps();
    const __m256 bias1 = bias ? _mm256_loadu_ps(bias + 8) : _mm256_setzero_ps();
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      _mm256_storeu_ps(c + i * ldc, _mm256_add_ps(acc0[i], bias0));
      _mm256_storeu_ps(c + i * ldc + 8, _mm256_add_ps(acc1[i], bias1));
    }
    return;
  }
  // The last panel of an N that is not a multiple of 16.
  alignas(32) float tmp[MR][kGemmNr];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    _mm256_store_ps(tmp[i], acc0[i]);
    _mm256_store_ps(tmp[i] + 8, acc1[i]);
  }
  for (int i = 0; i < MR; ++i)
    for (int o = 0; o < cols; ++o) c[i * ldc + o] = tmp[i][o] + (bias ? bias[o] : 0.0f);
}

#include "binary_mixed_linear/bml_cpu_kernels_common.inc"

}  // namespace

const CpuKernels* KernelsAvx2() { return &Table(); }

}  // namespace detail
}  // namespace bml
}  // namespace qexport

#endif  // x86-64; elsewhere KernelsAvx2() is a stub in bml_cpu_kernels_portable.cpp
