// AVX-512 (F/BW/VL) inner loops of the BinaryMixedLinear kernel. Built with
// -mavx512f -mavx512bw -mavx512vl -mfma; only called when the CPU has them.
// Tables: a 16-entry fp32 table fills one zmm register, so one vpermps looks up 16 output
// rows at once; a 64-byte load of a block's line gives the dwords of 16 rows, and nibble j,
// shifted down by 4j, indexes the table of nibble j directly (vpermps reads the low 4 bits).
// The lookups are summed with FMAs (x * 1 + acc, exact like an add): on Zen 5 the FMA pipes
// are otherwise idle here while adds compete with the permutes. (Measured on L1-resident
// data, per 16 rows x 8 weights: 1.6 cycles, against 2.4 with adds and a byte per load.)
// GEMM: an 8 x 32 micro-kernel (16 zmm accumulators, X broadcast, 2 panel loads per k).
#include "binary_mixed_linear/bml_cpu_kernels.h"

#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include <algorithm>

namespace qexport {
namespace bml {
namespace detail {
namespace {

// Prefetch distance of the weight stream in lut_dot, in dwords (x line bytes): with
// the weights in DRAM (M = 1, 4096x4096) the hardware prefetchers alone left the loop
// waiting (0.24 ms against 0.15 ms with this; 4 to 32 measured, 16 best).
constexpr int64_t kPrefetchDw = 16;

constexpr int kLutMaxBlocks = kGroupBlocks;

template <int NB>
inline void LutDotN(const uint8_t* w, int64_t line, const float* lut, int64_t ndw,
                    float* out, const float* scale) {
  // FMA latency x throughput wants >= 8 chains in flight: 4 accumulators per block for up to
  // 2 blocks, 2 for more (8 blocks x 2 + 8 tables fill the 32 registers).
  constexpr int kAcc = NB <= 2 ? 4 : 2;
  __m512 acc[NB][kAcc];
  for (int i = 0; i < NB; ++i)
    for (int j = 0; j < kAcc; ++j) acc[i][j] = _mm512_setzero_ps();
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int64_t q = 0; q < ndw; ++q) {
    const uint8_t* lines = w + q * line;
    for (int i = 0; i < NB; ++i)
      _mm_prefetch(reinterpret_cast<const char*>(lines + kPrefetchDw * line + i * kBlockLine),
                   _MM_HINT_T0);
    __m512 t[kNibbles];
    for (int j = 0; j < kNibbles; ++j) t[j] = _mm512_loadu_ps(lut + 16 * (kNibbles * q + j));
    for (int i = 0; i < NB; ++i) {
      const __m512i v = _mm512_loadu_si512(lines + i * kBlockLine);
      for (int j = 0; j < kNibbles; ++j) {
        const __m512i idx = j == 0 ? v : _mm512_srli_epi32(v, 4 * j);
        acc[i][j % kAcc] =
            _mm512_fmadd_ps(_mm512_permutexvar_ps(idx, t[j]), one, acc[i][j % kAcc]);
      }
    }
  }
  for (int i = 0; i < NB; ++i) {
    __m512 sum = acc[i][0];
    for (int j = 1; j < kAcc; ++j) sum = _mm512_add_ps(sum, acc[i][j]);
    float* o = out + kRowBlock * i;
    const __m512 prev = _mm512_loadu_ps(o);
    _mm512_storeu_ps(o, scale ? _mm512_fmadd_ps(_mm512_loadu_ps(scale + kRowBlock * i), sum, prev)
                              : _mm512_add_ps(prev, sum));
  }
}

// Split by channel kind with vcompressps: 16 channels per step, each part stored whole
// (kSplitSlack) and its pointer moved by its count.
#define BML_HAS_SPLIT_ROW
void SplitRow(const float* x, int64_t k, const uint16_t* bin_mask, const float* r2, float* xb,
              float* xs) {
  for (int64_t c0 = 0; c0 < k; c0 += 16) {
    const __mmask16 valid =
        k - c0 >= 16 ? 0xffff : static_cast<__mmask16>((1u << (k - c0)) - 1);
    const __m512 v = _mm512_maskz_loadu_ps(valid, x + c0);
    const __mmask16 bin = bin_mask[c0 / 16] & valid, sal = ~bin_mask[c0 / 16] & valid;
    __m512 b = _mm512_maskz_compress_ps(bin, v);
    const int nb = __builtin_popcount(bin);
    if (r2)
      b = _mm512_mul_ps(b, _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << nb) - 1), r2));
    _mm512_storeu_ps(xb, b);
    _mm512_storeu_ps(xs, _mm512_maskz_compress_ps(sal, v));
    xb += nb;
    if (r2) r2 += nb;
    xs += __builtin_popcount(sal);
  }
}

#define BML_HAS_SIGN_LUT
void SignLut(const float* x, int64_t ngroups, float* lut) {
  // Lane i: bit t of i ? +1 : -1.
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512 s[4];
  for (int t = 0; t < 4; ++t)
    s[t] = _mm512_mask_blend_ps(_mm512_test_epi32_mask(lane, _mm512_set1_epi32(1 << t)),
                                _mm512_set1_ps(-1.0f), _mm512_set1_ps(1.0f));
  for (int64_t g = 0; g < ngroups; ++g) {
    const float* xg = x + 4 * g;
    __m512 t = _mm512_mul_ps(s[0], _mm512_set1_ps(xg[0]));
    t = _mm512_fmadd_ps(s[1], _mm512_set1_ps(xg[1]), t);
    t = _mm512_fmadd_ps(s[2], _mm512_set1_ps(xg[2]), t);
    _mm512_storeu_ps(lut + 16 * g, _mm512_fmadd_ps(s[3], _mm512_set1_ps(xg[3]), t));
  }
}

template <bool kR2>
void DequantSignsT(const uint8_t* w, int64_t line, int64_t kb, const int32_t* chan,
                   const float* r2, const float* pos, const float* neg, float* panel,
                   int64_t ld) {
  const __m512 vp = _mm512_loadu_ps(pos), vn = _mm512_loadu_ps(neg);
  for (int64_t c0 = 0; c0 < kb; c0 += 32) {
    const __m512i v = _mm512_loadu_si512(w + (c0 / 32) * line);
    const int nt = static_cast<int>(std::min<int64_t>(32, kb - c0));
    for (int t = 0; t < nt; ++t) {
      const __mmask16 bit =
          _mm512_test_epi32_mask(v, _mm512_set1_epi32(static_cast<int>(1u << t)));
      __m512 val = _mm512_mask_blend_ps(bit, vn, vp);
      if (kR2) val = _mm512_mul_ps(val, _mm512_set1_ps(r2[c0 + t]));
      _mm512_storeu_ps(panel + chan[c0 + t] * ld, val);
    }
  }
}

void DequantCodes(const uint8_t* w, int64_t line, int64_t ndw, const int32_t* chan,
                  const float* scale, const float* szero, float* panel, int64_t ld) {
  const __m512 vs = _mm512_loadu_ps(scale), vz = _mm512_loadu_ps(szero);
  const __m512i mask = _mm512_set1_epi32(15);
  for (int64_t q = 0; q < ndw; ++q) {
    const __m512i v = _mm512_loadu_si512(w + q * line);
    for (int j = 0; j < kNibbles; ++j) {
      const int32_t c = chan[kNibbles * q + j];
      if (c < 0) continue;  // padding slot
      const __m512 code =
          _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(v, 4 * j), mask));
      _mm512_storeu_ps(panel + c * ld, _mm512_fmsub_ps(vs, code, vz));
    }
  }
}

#define BML_HAS_GEMM
constexpr int kGemmMr = 8;  // 6, 12, 14 measured: no faster
constexpr int kGemmNr = 32;
// Fit on Zen 5 (bml_cpu_kernels.h): a lookup costs 1.8 GEMM steps for 4 binary weights, so
// the tables win where the weights are mostly binary and N is large enough to repay their
// build per row of X; the GEMM where salient codes dominate or N is small.
constexpr GemmCosts kGemmCosts{1.77f, 4.1f, 13.2f, 16.6f, 10.0f, 4};

template <int MR>
inline void GemmTile(const float* a, int64_t lda, const float* b, int64_t k, const float* bias,
                     float* c, int64_t ldc, int cols) {
  // Every loop over the accumulators unrolled (see the AVX2 file).
  __m512 acc0[MR], acc1[MR];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) acc0[i] = acc1[i] = _mm512_setzero_ps();
  for (int64_t kk = 0; kk < k; ++kk) {
    const __m512 b0 = _mm512_loadu_ps(b + kGemmNr * kk);
    const __m512 b1 = _mm512_loadu_ps(b + kGemmNr * kk + 16);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const __m512 av = _mm512_set1_ps(a[i * lda + kk]);
      acc0[i] = _mm512_fmadd_ps(av, b0, acc0[i]);
      acc1[i] = _mm512_fmadd_ps(av, b1, acc1[i]);
    }
  }
  const __mmask16 m0 = cols >= 16 ? 0xffff : static_cast<__mmask16>((1u << cols) - 1);
  const __mmask16 m1 =
      cols >= 32 ? 0xffff : cols > 16 ? static_cast<__mmask16>((1u << (cols - 16)) - 1) : 0;
  const __m512 bias0 = bias ? _mm512_maskz_loadu_ps(m0, bias) : _mm512_setzero_ps();
  const __m512 bias1 = bias ? _mm512_maskz_loadu_ps(m1, bias + 16) : _mm512_setzero_ps();
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
    _mm512_mask_storeu_ps(c + i * ldc, m0, _mm512_add_ps(acc0[i], bias0));
    _mm512_mask_storeu_ps(c + i * ldc + 16, m1, _mm512_add_ps(acc1[i], bias1));
  }
}

#include "binary_mixed_linear/bml_cpu_kernels_common.inc"

}  // namespace

const CpuKernels* KernelsAvx512() { return &Table(); }

}  // namespace detail
}  // namespace bml
}  // namespace qexport

#endif  // x86-64; elsewhere KernelsAvx512() is a stub in bml_cpu_kernels_portable.cpp
