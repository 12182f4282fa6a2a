// qexport::BinaryMixedLinear, layout 1 (docs/format.md): index and unpack logic shared by the
// CUDA kernels (bml_cuda.cu), the host tests (tests/cpp/test_unpack.cpp) and, if it wants,
// the CPU kernel. Header only, no dependencies: every function is `inline` and, under nvcc,
// `__host__ __device__`, so one definition serves both sides.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define QEXPORT_HD __host__ __device__ __forceinline__
#else
#define QEXPORT_HD inline
#endif

namespace qexport {
namespace bml {
namespace unpack {

QEXPORT_HD int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Bytes per row of sign_packed and salient_packed.
QEXPORT_HD int64_t SignBytes(int64_t k, int64_t s) { return CeilDiv(k - s, 8); }
QEXPORT_HD int64_t SalientBytes(int64_t s) { return CeilDiv(s, 2); }

// Effective group size: salient_group_size, or s when it is 0 (one group per row).
QEXPORT_HD int64_t GroupSize(int64_t s, int64_t group_size) {
  return group_size > 0 ? group_size : (s > 0 ? s : 1);
}
// Groups per row: ceil(s / G); 0 when s == 0.
QEXPORT_HD int64_t NumGroups(int64_t s, int64_t group_size) {
  return s <= 0 ? 0 : CeilDiv(s, GroupSize(s, group_size));
}
// Group of salient column j (its position in salient_idx).
QEXPORT_HD int64_t GroupOf(int64_t j, int64_t s, int64_t group_size) {
  return j / GroupSize(s, group_size);
}

// Sign of binary column c of a row whose packed bytes start at `row`: +1 (bit 1) or -1.
QEXPORT_HD int SignBit(const uint8_t* row, int64_t c) { return (row[c >> 3] >> (c & 7)) & 1; }
QEXPORT_HD float SignValue(const uint8_t* row, int64_t c) {
  return SignBit(row, c) ? 1.0f : -1.0f;
}

// 4-bit code of salient column j: low nibble when j is even, high nibble when odd.
QEXPORT_HD int Nibble(const uint8_t* row, int64_t j) {
  return (row[j >> 1] >> ((j & 1) * 4)) & 0xf;
}

// The c-th binary column's input channel (the c-th channel, ascending, not in salient_idx).
// salient_idx[j] - j is non-decreasing when salient_idx is strictly increasing, and the
// answer is c + #{j : salient_idx[j] - j <= c}: a binary search, O(log s).
// For an invalid salient_idx the result is still clamped to [0, k) (memory safety only).
QEXPORT_HD int64_t BinaryChannel(int64_t c, const int32_t* salient_idx, int64_t s, int64_t k) {
  int64_t lo = 0, hi = s;  // first j with salient_idx[j] - j > c
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (static_cast<int64_t>(salient_idx[mid]) - mid <= c) lo = mid + 1; else hi = mid;
  }
  int64_t ch = c + lo;
  if (ch < 0) ch = 0;
  if (ch >= k) ch = k - 1;
  return ch;
}

// Clamp of a salient channel into [0, k) (kernels index X with it; contents are validated
// elsewhere, this only keeps a bad value from reading out of bounds).
QEXPORT_HD int64_t ClampChannel(int64_t ch, int64_t k) {
  return ch < 0 ? 0 : (ch >= k ? k - 1 : ch);
}

// IEEE 754 binary16 <-> binary32 bit conversions, round to nearest even, NaN and infinities
// kept (same results as numpy and as CUDA's __half2float / __float2half_rn).
QEXPORT_HD float HalfBitsToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    const float f = static_cast<float>(mant) * 5.9604644775390625e-08f;  // mant * 2^-24, exact
    return sign ? -f : f;
  } else if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 112u) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

QEXPORT_HD uint16_t FloatToHalfBits(float f) {
  uint32_t x;
  std::memcpy(&x, &f, sizeof x);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t absx = x & 0x7fffffffu;
  if (absx >= 0x7f800000u) {
    if (absx == 0x7f800000u) return static_cast<uint16_t>(sign | 0x7c00u);
    return static_cast<uint16_t>(sign | 0x7e00u | ((absx >> 13) & 0x3ffu));
  }
  if (absx >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520: inf
  if (absx >= 0x38800000u) {
    uint32_t h = (((absx >> 23) - 112u) << 10) | ((absx >> 13) & 0x3ffu);
    const uint32_t rem = absx & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
    return static_cast<uint16_t>(sign | h);
  }
  const uint32_t e = absx >> 23;
  if (e < 102u) return static_cast<uint16_t>(sign);
  const uint32_t m24 = (absx & 0x7fffffu) | 0x800000u;
  const uint32_t shift = 126u - e;
  uint32_t q = m24 >> shift;
  const uint32_t rem = m24 & ((1u << shift) - 1u);
  const uint32_t half = 1u << (shift - 1u);
  if (rem > half || (rem == half && (q & 1u))) ++q;
  return static_cast<uint16_t>(sign | q);
}

// Salient weight of column j of a row: (q - zero[g]) * scale[g], g = GroupOf(j).
QEXPORT_HD float SalientWeight(const uint8_t* packed_row, const uint16_t* scale_row,
                               const uint8_t* zero_row, int64_t j, int64_t s,
                               int64_t group_size) {
  const int64_t g = GroupOf(j, s, group_size);
  return static_cast<float>(Nibble(packed_row, j) - static_cast<int>(zero_row[g])) *
         HalfBitsToFloat(scale_row[g]);
}

}  // namespace unpack
}  // namespace bml
}  // namespace qexport
