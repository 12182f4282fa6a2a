// AVX-512 (F/BW/VL + VBMI + VNNI) inner loops of the BinaryMixedLinear kernel. Built with
// -mavx512f -mavx512bw -mavx512vl -mavx512vbmi -mavx512vnni -mfma; only called when the CPU
// has them (Ice Lake, Zen 4 and later).
// Tables: integer entries, a table section scaled so that its largest entry is 7,875,000
// (~23 bits; the builder returns the scale), each held as 3 signed base-250 digits in 3
// byte tables (docs/kernels.md). A 64-byte load of a block's line gives 16 rows x 4 bytes,
// byte e of row r holding nibbles 2e and 2e + 1. Masked to a nibble, with e put in bits 4..5
// (one vpternlogd), each byte indexes a 64-byte register holding 4 tables (those of nibbles
// 0, 2, 4, 6, or of 1, 3, 5, 7): one vpermb looks up 64 digits, 16 rows x 4 nibbles, and one
// vpdpbusd multiplies them by 1 or 250 and adds a row's 4 into its int32 lane. 15
// instructions per line where fp32 tables (vpermps, 16 entries per lookup) took 23: 1.30
// against 1.94 ns per line on L1-resident data (Zen 5).
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
// An entry v (an integer, |v| <= kEntryMax) is held as 3 signed digits of base kBase,
// v = d2 * kBase^2 + d1 * kBase + d0 with |d| <= 126, each a byte of its own table. Table
// bytes per packed dword: [even nibbles: d2 | d1 | d0 | odd nibbles: d2 | d1 | d0], 64
// bytes each; byte 16 e + i of a part is the digit of entry i of nibble 2e (or 2e + 1).
constexpr int kBase = 250;
constexpr float kEntryMax = 126.0f * kBase * kBase;  // 7,875,000: ~23 bits
constexpr int64_t kLutDwBytes = 6 * 64;
constexpr int64_t kLutDwFloats = kLutDwBytes / 4;
constexpr bool kByteMajor = false;
// Dwords per integer sum: 8 x 4096 lookups of at most 126 * (kBase + 1) stay below 2^31.
constexpr int64_t kSumDw = 4096;

template <int NB>
inline void LutDotN(const uint8_t* w, int64_t line, const float* lut, int64_t ndw,
                    float* out, const float* scale, float tscale) {
  const __m512i one = _mm512_set1_epi8(1), base = _mm512_set1_epi8(static_cast<char>(kBase));
  const __m512i nibble = _mm512_set1_epi8(0x0f);
  const __m512i table_of_byte = _mm512_set1_epi32(0x30201000);  // byte e -> e << 4
  const __m512 ts = _mm512_set1_ps(tscale), base2 = _mm512_set1_ps(float(kBase) * kBase);
  const uint8_t* tables = reinterpret_cast<const uint8_t*>(lut);
  for (int64_t q0 = 0; q0 < ndw; q0 += kSumDw) {
    const int64_t q1 = std::min(ndw, q0 + kSumDw);
    // hi: sum of d2; lo: sum of d1 * kBase + d0 (vpdpbusd: unsigned constant x signed digit).
    __m512i hi[NB], lo[NB];
    for (int i = 0; i < NB; ++i) hi[i] = lo[i] = _mm512_setzero_si512();
    for (int64_t q = q0; q < q1; ++q) {
      const uint8_t* lines = w + q * line;
      for (int i = 0; i < NB; ++i)
        _mm_prefetch(reinterpret_cast<const char*>(lines + kPrefetchDw * line + i * kBlockLine),
                     _MM_HINT_T0);
      const uint8_t* t = tables + kLutDwBytes * q;
      const __m512i e2 = _mm512_loadu_si512(t), e1 = _mm512_loadu_si512(t + 64),
                    e0 = _mm512_loadu_si512(t + 128), o2 = _mm512_loadu_si512(t + 192),
                    o1 = _mm512_loadu_si512(t + 256), o0 = _mm512_loadu_si512(t + 320);
      for (int i = 0; i < NB; ++i) {
        const __m512i v = _mm512_loadu_si512(lines + i * kBlockLine);
        // (v & nibble) | table_of_byte: the even nibbles' indices, then the odd ones'.
        const __m512i ie = _mm512_ternarylogic_epi32(v, nibble, table_of_byte, 0xea);
        const __m512i io =
            _mm512_ternarylogic_epi32(_mm512_srli_epi32(v, 4), nibble, table_of_byte, 0xea);
        hi[i] = _mm512_dpbusd_epi32(hi[i], one, _mm512_permutexvar_epi8(ie, e2));
        lo[i] = _mm512_dpbusd_epi32(lo[i], base, _mm512_permutexvar_epi8(ie, e1));
        lo[i] = _mm512_dpbusd_epi32(lo[i], one, _mm512_permutexvar_epi8(ie, e0));
        hi[i] = _mm512_dpbusd_epi32(hi[i], one, _mm512_permutexvar_epi8(io, o2));
        lo[i] = _mm512_dpbusd_epi32(lo[i], base, _mm512_permutexvar_epi8(io, o1));
        lo[i] = _mm512_dpbusd_epi32(lo[i], one, _mm512_permutexvar_epi8(io, o0));
      }
    }
    for (int i = 0; i < NB; ++i) {
      const __m512 sum = _mm512_mul_ps(
          ts, _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi[i]), base2, _mm512_cvtepi32_ps(lo[i])));
      float* o = out + kRowBlock * i;
      const __m512 prev = _mm512_loadu_ps(o);
      _mm512_storeu_ps(o, scale ? _mm512_fmadd_ps(_mm512_loadu_ps(scale + kRowBlock * i), sum,
                                                  prev)
                                : _mm512_add_ps(prev, sum));
    }
  }
}

inline void StoreDigits(uint8_t* dst, __m512 d) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst),
                   _mm512_cvtepi32_epi8(_mm512_cvt_roundps_epi32(
                       d, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)));
}

// Stores the 16 entries of table g (already scaled to at most kEntryMax) as digits, in the
// layout of kLutDwBytes. Each digit is rounded to the nearest of what is left, so |d| <= 126
// whichever way a rounding near one half goes, and v is rounded to an integer once (d0).
inline void StoreTable(uint8_t* tables, int64_t g, __m512 v) {
  constexpr int kNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  const float base2 = float(kBase) * kBase;
  const __m512 d2 =
      _mm512_roundscale_ps(_mm512_mul_ps(v, _mm512_set1_ps(1.0f / base2)), kNearest);
  const __m512 r = _mm512_fnmadd_ps(d2, _mm512_set1_ps(base2), v);  // exact
  const __m512 d1 =
      _mm512_roundscale_ps(_mm512_mul_ps(r, _mm512_set1_ps(1.0f / kBase)), kNearest);
  const int64_t j = g % kNibbles;
  uint8_t* part = tables + kLutDwBytes * (g / kNibbles) + 192 * (j & 1) + 16 * (j >> 1);
  StoreDigits(part, d2);
  StoreDigits(part + 64, d1);
  StoreDigits(part + 128, _mm512_fnmadd_ps(d1, _mm512_set1_ps(kBase), r));
}

// The largest lane (not _mm512_reduce_max_ps: GCC 12 warns on its own header's code there).
inline float MaxLane(__m512 v) {
  float lanes[16];
  _mm512_storeu_ps(lanes, v);
  return *std::max_element(lanes, lanes + 16);
}

// 1 / the step of a section whose largest entry is `largest` (0 for an all-zero section).
inline float EntryScale(float largest) { return largest > 0.0f ? kEntryMax / largest : 0.0f; }

#define BML_HAS_SIGN_LUT
float SignLut(const float* x, int64_t ndw, float* lut) {
  // The largest entry of table g is sum_t |x[4g + t]|: summed over lanes 4g..4g+3 in place.
  __m512 largest = _mm512_setzero_ps();
  for (int64_t c = 0; c < 32 * ndw; c += 16) {
    __m512 a = _mm512_abs_ps(_mm512_loadu_ps(x + c));
    a = _mm512_add_ps(a, _mm512_permute_ps(a, 0xb1));
    largest = _mm512_max_ps(largest, _mm512_add_ps(a, _mm512_permute_ps(a, 0x4e)));
  }
  const float top = MaxLane(largest), inv = EntryScale(top);
  // Lane i: bit t of i ? +1 : -1.
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512 s[4];
  for (int t = 0; t < 4; ++t)
    s[t] = _mm512_mask_blend_ps(_mm512_test_epi32_mask(lane, _mm512_set1_epi32(1 << t)),
                                _mm512_set1_ps(-inv), _mm512_set1_ps(inv));
  uint8_t* tables = reinterpret_cast<uint8_t*>(lut);
  for (int64_t g = 0; g < kNibbles * ndw; ++g) {
    const float* xg = x + 4 * g;
    __m512 t = _mm512_mul_ps(s[0], _mm512_set1_ps(xg[0]));
    t = _mm512_fmadd_ps(s[1], _mm512_set1_ps(xg[1]), t);
    t = _mm512_fmadd_ps(s[2], _mm512_set1_ps(xg[2]), t);
    StoreTable(tables, g, _mm512_fmadd_ps(s[3], _mm512_set1_ps(xg[3]), t));
  }
  return inv > 0.0f ? top / kEntryMax : 0.0f;
}

#define BML_HAS_CODE_LUT
float CodeLut(const float* x, int64_t ndw, float* lut) {
  __m512 largest = _mm512_setzero_ps();
  for (int64_t c = 0; c < kNibbles * ndw; c += 16)
    largest = _mm512_max_ps(
        largest, _mm512_abs_ps(_mm512_maskz_loadu_ps(
                     kNibbles * ndw - c >= 16 ? 0xffff : 0x00ff, x + c)));
  const float top = 15.0f * MaxLane(largest), inv = EntryScale(top);
  const __m512 codes = _mm512_mul_ps(
      _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_ps(inv));
  uint8_t* tables = reinterpret_cast<uint8_t*>(lut);
  for (int64_t j = 0; j < kNibbles * ndw; ++j)
    StoreTable(tables, j, _mm512_mul_ps(codes, _mm512_set1_ps(x[j])));
  return inv > 0.0f ? top / kEntryMax : 0.0f;
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
