// AVX2 + FMA inner loops of the BinaryMixedLinear kernel. Built with -mavx2 -mfma; only
// called when the CPU has them. Tables: integer entries looked up with vpshufb over
// byte-major lines (below). GEMM: a 6 x 16 micro-kernel (12 ymm accumulators, X broadcast,
// 2 panel loads per k).
#include "binary_mixed_linear/bml_cpu_kernels.h"

#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include <algorithm>

namespace qexport {
namespace bml {
namespace detail {
namespace {

// Tables: the AVX-512 path's integer entries (a section scaled so that its largest entry is
// 7,875,000, each entry held as 3 signed base-250 digits), built by the same arithmetic, so
// both paths sum the same integers and give the same results. Lookups with vpshufb (a
// 16-entry byte table per 128-bit lane) need one nibble position per lane, so this path's
// lines are byte-major (CpuKernels::byte_major): bytes 0..31 of a block's line are byte 0 of
// rows 0..15, then byte 1; bytes 32..63 bytes 2 and 3. Masked to its low (high) nibbles, the
// first half indexes the tables of nibbles 0 | 2 (1 | 3), the second those of 4 | 6 (5 | 7):
// 4 vpshufb look up 16 rows x 8 nibbles per digit. Each lookup's bytes, 16 rows x 2 tables,
// are paired with another lookup's (vpunpck[lh]bw: byte r of both side by side) and summed
// into int16 by vpmaddubsw with weights 1 (rows 0..7 and 8..15 of each lane), then added over
// a chunk of kChunkDw dwords (at most 16 x 4 x 126 per lane), then in int32. Per line (16 rows
// x 32 weights): 2 loads, 6 ops for the indices, 12 table loads, 12 vpshufb, 12 unpacks, 12
// vpmaddubsw, 12 adds; no cross-lane shuffle. (Widening each lookup by two vpmaddubsw with
// 0/1 weights, even and odd rows, without the unpacks: 17 % slower on Zen 5.)
constexpr int kLutMaxBlocks = kGroupBlocks;  // a group per call; its blocks one at a time
constexpr bool kByteMajor = true;
constexpr int kBase = 250;
constexpr float kEntryMax = 126.0f * kBase * kBase;  // 7,875,000: ~23 bits
// Table bytes per packed dword: per digit (d2, d1, d0) 4 registers of 2 tables,
// [0 | 2] [1 | 3] [4 | 6] [5 | 7] (the tables of nibbles j of the dword).
constexpr int64_t kDigitBytes = 128;
constexpr int64_t kLutDwBytes = 3 * kDigitBytes;
constexpr int64_t kLutDwFloats = kLutDwBytes / 4;
constexpr int64_t kSumDw = 4096;   // dwords per int32 sum (as on AVX-512: no overflow)
constexpr int64_t kChunkDw = 16;   // dwords per int16 sum: 16 x 4 x 126 < 2^15

// Offset of table j (< 8) of a dword in its digit's kDigitBytes.
constexpr int64_t TableOffset(int j) { return 32 * (2 * (j >> 2) + (j & 1)) + 16 * ((j >> 1) & 1); }

// int16 sums of one block over dwords [q0, q1) (per digit d: acc[d][half], rows 8 half..
// 8 half + 7, lane h holding the tables of the register's lane h), added to `sums` (int32,
// [digit][half][lane h][8]).
inline void ChunkSums(const uint8_t* w, int64_t line, const uint8_t* tables, int64_t q0,
                      int64_t q1, const uint8_t* pf, int64_t pf_step, int32_t* sums) {
  const __m256i nibble = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi8(1);
  __m256i acc[3][2];
#pragma GCC unroll 3
  for (int d = 0; d < 3; ++d) acc[d][0] = acc[d][1] = _mm256_setzero_si256();
  for (int64_t q = q0; q < q1; ++q) {
    _mm_prefetch(reinterpret_cast<const char*>(pf + (q - q0) * pf_step), _MM_HINT_T0);
    const uint8_t* l = w + q * line;
    const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(l));
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(l + 32));
    const __m256i idx[4] = {_mm256_and_si256(a, nibble),
                            _mm256_and_si256(_mm256_srli_epi16(a, 4), nibble),
                            _mm256_and_si256(b, nibble),
                            _mm256_and_si256(_mm256_srli_epi16(b, 4), nibble)};
    const uint8_t* t = tables + kLutDwBytes * q;
#pragma GCC unroll 3
    for (int d = 0; d < 3; ++d) {
      __m256i lk[4];
#pragma GCC unroll 4
      for (int r = 0; r < 4; ++r)
        lk[r] = _mm256_shuffle_epi8(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t + kDigitBytes * d + 32 * r)),
            idx[r]);
      // Bytes r of lookups 0 and 1 (2 and 3) side by side, then summed in int16: rows 0..7
      // (unpacklo) and 8..15 (unpackhi) of each lane.
      acc[d][0] = _mm256_add_epi16(
          acc[d][0], _mm256_add_epi16(
                         _mm256_maddubs_epi16(ones, _mm256_unpacklo_epi8(lk[0], lk[1])),
                         _mm256_maddubs_epi16(ones, _mm256_unpacklo_epi8(lk[2], lk[3]))));
      acc[d][1] = _mm256_add_epi16(
          acc[d][1], _mm256_add_epi16(
                         _mm256_maddubs_epi16(ones, _mm256_unpackhi_epi8(lk[0], lk[1])),
                         _mm256_maddubs_epi16(ones, _mm256_unpackhi_epi8(lk[2], lk[3]))));
    }
  }
#pragma GCC unroll 3
  for (int d = 0; d < 3; ++d)
#pragma GCC unroll 2
    for (int half = 0; half < 2; ++half) {
      __m256i* s = reinterpret_cast<__m256i*>(sums + 16 * (2 * d + half));
      const __m256i v = acc[d][half];
      s[0] = _mm256_add_epi32(s[0], _mm256_cvtepi16_epi32(_mm256_castsi256_si128(v)));
      s[1] = _mm256_add_epi32(s[1], _mm256_cvtepi16_epi32(_mm256_extracti128_si256(v, 1)));
    }
}

template <int NB>
inline void LutDotN(const uint8_t* w, int64_t line, const float* lut, int64_t ndw,
                    float* out, const float* scale, float tscale) {
  const uint8_t* tables = reinterpret_cast<const uint8_t*>(lut);
  const __m256 ts = _mm256_set1_ps(tscale), base2 = _mm256_set1_ps(float(kBase) * kBase);
  // Per block: [digit][half][lane][8 rows].
  alignas(32) int32_t sums[NB][3 * 2 * 16];
  for (int64_t q0 = 0; q0 < ndw; q0 += kSumDw) {
    const int64_t q1 = std::min(ndw, q0 + kSumDw);
    std::memset(sums, 0, sizeof(sums));
    for (int64_t c0 = q0; c0 < q1; c0 += kChunkDw) {
      const int64_t c1 = std::min(q1, c0 + kChunkDw);
      // The chunk's blocks are read one after another, each strided by `line`; the next
      // chunk's bytes are prefetched as one sequential stream meanwhile, a cache line per
      // dword read (this chunk's pass i prefetches its part i).
      const int64_t span = (c1 - c0) * 64;
      for (int i = 0; i < NB; ++i)
        ChunkSums(w + i * kBlockLine, line, tables, c0, c1, w + c1 * line + i * span, 64,
                  sums[i]);
    }
    for (int i = 0; i < NB; ++i) {
      // Lane sums, then d2 and 250 d1 + d0 (exact int32), joined in fp32 as on AVX-512.
      alignas(32) int32_t hi[kRowBlock], lo[kRowBlock];
      const int32_t* s = sums[i];
      for (int half = 0; half < 2; ++half)
        for (int j = 0; j < 8; ++j) {
          const int r = 8 * half + j;
          auto digit = [&](int d) {
            return s[16 * (2 * d + half) + j] + s[16 * (2 * d + half) + 8 + j];
          };
          hi[r] = digit(0);
          lo[r] = digit(1) * kBase + digit(2);
        }
      for (int h = 0; h < 2; ++h) {
        const __m256 sum = _mm256_mul_ps(
            ts, _mm256_fmadd_ps(
                    _mm256_cvtepi32_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(hi + 8 * h))),
                    base2,
                    _mm256_cvtepi32_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(lo + 8 * h)))));
        float* o = out + kRowBlock * i + 8 * h;
        const __m256 prev = _mm256_loadu_ps(o);
        _mm256_storeu_ps(o, scale ? _mm256_fmadd_ps(_mm256_loadu_ps(scale + kRowBlock * i + 8 * h),
                                                    sum, prev)
                                  : _mm256_add_ps(prev, sum));
      }
    }
  }
}

// 16 int32 lanes (two registers, each in [-126, 126]) as 16 bytes in order.
inline void StoreDigits(uint8_t* dst, __m256 lo, __m256 hi) {
  const __m256i w16 = _mm256_permute4x64_epi64(
      _mm256_packs_epi32(_mm256_cvtps_epi32(lo), _mm256_cvtps_epi32(hi)), 0xd8);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst),
                   _mm_packs_epi16(_mm256_castsi256_si128(w16), _mm256_extracti128_si256(w16, 1)));
}

// Stores the 16 entries of table g (entries 0..7 in lo, 8..15 in hi, scaled to at most
// kEntryMax) as digits, by the AVX-512 path's arithmetic (StoreTable there).
inline void StoreTable(uint8_t* tables, int64_t g, __m256 lo, __m256 hi) {
  constexpr int kNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  const __m256 base2 = _mm256_set1_ps(float(kBase) * kBase), inv2 = _mm256_set1_ps(1.0f / (float(kBase) * kBase));
  const __m256 base = _mm256_set1_ps(float(kBase)), inv = _mm256_set1_ps(1.0f / kBase);
  uint8_t* t = tables + kLutDwBytes * (g / kNibbles) + TableOffset(static_cast<int>(g % kNibbles));
  __m256 d2[2], d1[2], d0[2];
  const __m256 v[2] = {lo, hi};
  for (int h = 0; h < 2; ++h) {
    d2[h] = _mm256_round_ps(_mm256_mul_ps(v[h], inv2), kNearest);
    const __m256 r = _mm256_fnmadd_ps(d2[h], base2, v[h]);  // exact
    d1[h] = _mm256_round_ps(_mm256_mul_ps(r, inv), kNearest);
    d0[h] = _mm256_fnmadd_ps(d1[h], base, r);  // rounded by the conversion
  }
  StoreDigits(t, d2[0], d2[1]);
  StoreDigits(t + kDigitBytes, d1[0], d1[1]);
  StoreDigits(t + 2 * kDigitBytes, d0[0], d0[1]);
}

inline float MaxLane(__m256 v) {
  float lanes[8];
  _mm256_storeu_ps(lanes, v);
  return *std::max_element(lanes, lanes + 8);
}

inline float EntryScale(float largest) { return largest > 0.0f ? kEntryMax / largest : 0.0f; }

#define BML_HAS_SIGN_LUT
float SignLut(const float* x, int64_t ndw, float* lut) {
  // The largest entry of table g is sum_t |x[4g + t]|, summed as on AVX-512.
  __m256 largest = _mm256_setzero_ps();
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  for (int64_t c = 0; c < 32 * ndw; c += 8) {
    __m256 a = _mm256_and_ps(_mm256_loadu_ps(x + c), abs_mask);
    a = _mm256_add_ps(a, _mm256_permute_ps(a, 0xb1));
    largest = _mm256_max_ps(largest, _mm256_add_ps(a, _mm256_permute_ps(a, 0x4e)));
  }
  const float top = MaxLane(largest), scale = EntryScale(top);
  // Entry i: bit t of i ? +scale : -scale; lanes 0..7 entries 0..7, then 8..15 (bit 3 set).
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256 pos = _mm256_set1_ps(scale), neg = _mm256_set1_ps(-scale);
  __m256 s[3];
  for (int t = 0; t < 3; ++t)
    s[t] = _mm256_blendv_ps(neg, pos, _mm256_castsi256_ps(_mm256_slli_epi32(lane, 31 - t)));
  uint8_t* tables = reinterpret_cast<uint8_t*>(lut);
  for (int64_t g = 0; g < kNibbles * ndw; ++g) {
    const float* xg = x + 4 * g;
    __m256 t = _mm256_mul_ps(s[0], _mm256_set1_ps(xg[0]));
    t = _mm256_fmadd_ps(s[1], _mm256_set1_ps(xg[1]), t);
    t = _mm256_fmadd_ps(s[2], _mm256_set1_ps(xg[2]), t);
    const __m256 x3 = _mm256_set1_ps(xg[3]);
    StoreTable(tables, g, _mm256_fmadd_ps(neg, x3, t), _mm256_fmadd_ps(pos, x3, t));
  }
  return scale > 0.0f ? top / kEntryMax : 0.0f;
}

#define BML_HAS_CODE_LUT
float CodeLut(const float* x, int64_t ndw, float* lut) {
  __m256 largest = _mm256_setzero_ps();
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  for (int64_t c = 0; c < kNibbles * ndw; c += 8)
    largest = _mm256_max_ps(largest, _mm256_and_ps(_mm256_loadu_ps(x + c), abs_mask));
  const float top = 15.0f * MaxLane(largest), scale = EntryScale(top);
  const __m256 lo = _mm256_mul_ps(_mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_ps(scale));
  const __m256 hi =
      _mm256_mul_ps(_mm256_setr_ps(8, 9, 10, 11, 12, 13, 14, 15), _mm256_set1_ps(scale));
  uint8_t* tables = reinterpret_cast<uint8_t*>(lut);
  for (int64_t j = 0; j < kNibbles * ndw; ++j) {
    const __m256 v = _mm256_set1_ps(x[j]);
    StoreTable(tables, j, _mm256_mul_ps(lo, v), _mm256_mul_ps(hi, v));
  }
  return scale > 0.0f ? top / kEntryMax : 0.0f;
}

// The dwords of rows 0..7 (*v0) and 8..15 (*v1) of a byte-major line (a 4 x 16 byte
// transpose), as the GEMM's dequantization reads them.
inline void RowDwords(const uint8_t* line, __m256i* v0, __m256i* v1) {
  const __m128i c0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(line));
  const __m128i c1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(line + 16));
  const __m128i c2 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(line + 32));
  const __m128i c3 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(line + 48));
  const __m128i a_lo = _mm_unpacklo_epi8(c0, c1), a_hi = _mm_unpackhi_epi8(c0, c1);
  const __m128i b_lo = _mm_unpacklo_epi8(c2, c3), b_hi = _mm_unpackhi_epi8(c2, c3);
  *v0 = _mm256_set_m128i(_mm_unpackhi_epi16(a_lo, b_lo), _mm_unpacklo_epi16(a_lo, b_lo));
  *v1 = _mm256_set_m128i(_mm_unpackhi_epi16(a_hi, b_hi), _mm_unpacklo_epi16(a_hi, b_hi));
}

template <bool kR2>
void DequantSignsT(const uint8_t* w, int64_t line_bytes, int64_t kb, const int32_t* chan,
                   const float* r2, const float* pos, const float* neg, float* panel,
                   int64_t ld) {
  const __m256 p0 = _mm256_loadu_ps(pos), p1 = _mm256_loadu_ps(pos + 8);
  const __m256 n0 = _mm256_loadu_ps(neg), n1 = _mm256_loadu_ps(neg + 8);
  for (int64_t c0 = 0; c0 < kb; c0 += 32) {
    __m256i v0, v1;
    RowDwords(w + (c0 / 32) * line_bytes, &v0, &v1);
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
    __m256i v0, v1;
    RowDwords(w + q * line_bytes, &v0, &v1);
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
// Fit on Zen 5 run as AVX2 (bml_cpu_kernels.h; docs/kernels.md): with the integer tables a
// lookup costs 2.6 GEMM steps (3.7 with the fp32 tables before), so the tables serve up to
// M ~ 8 on SmolLM2's shapes and up to M ~ 32-64 at 4096 x 4096.
constexpr GemmCosts kGemmCosts{2.6f, 1.0f, 8.8f, 16.0f, 2.0f, 4};

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
