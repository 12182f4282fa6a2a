// qexport::BinaryMixedLinear, layout 1 (docs/format.md): index and unpack logic shared by the
// CUDA kernels (bml_cuda*.cu), the host tests (tests/cpp/unpack_capi.cpp) and, if it wants,
// the CPU kernel. Header only, no dependencies: every function is `inline` and, under nvcc,
// `__host__ __device__`, so one definition serves both sides.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#include <cuda_fp16.h>
#define QEXPORT_HD __host__ __device__ __forceinline__
#else
#define QEXPORT_HD inline
#endif

namespace qexport {
namespace bml {
namespace unpack {

// ceil(a / b) for a >= 0, b > 0, without the overflow of (a + b - 1) / b near INT64_MAX.
QEXPORT_HD int64_t CeilDiv(int64_t a, int64_t b) { return a / b + (a % b != 0); }

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


// fp32 -> fp16 bits, round to nearest even: the hardware conversion on the device, the
// bit-exact software one (FloatToHalfBits, tested against numpy) on the host.
QEXPORT_HD uint16_t FloatToHalfRn(float f) {
#if defined(__CUDA_ARCH__)
  return __half_as_ushort(__float2half_rn(f));
#else
  return FloatToHalfBits(f);
#endif
}

// Salient weight of column j rounded once to fp16 (what the tensor-core path multiplies).
QEXPORT_HD uint16_t SalientWeightHalfBits(const uint8_t* packed_row, const uint16_t* scale_row,
                                          const uint8_t* zero_row, int64_t j, int64_t s,
                                          int64_t group_size) {
  return FloatToHalfRn(SalientWeight(packed_row, scale_row, zero_row, j, s, group_size));
}

// ---------------------------------------------------------------------------------------------
// Tensor-core GEMM (bml_cuda_gemm_tc.cu, GemmTcKernel): tile geometry, the mma.sync.m16n8k16
// fragment layouts and the per-element staging/dequant steps, shared with the host emulation in
// tests/cpp/unpack_capi.cpp (tests/test_gpu_unpack.py checks them against the PTX ISA layout,
// numpy and the PyTorch reference).
//
// Block: kTcThreads threads = kTcWarpsM x kTcWarpsN warps, output tile kTcBM x kTcBN, K step
// kTcBK. Each warp owns a kTcWarpTileM x kTcWarpTileN sub-tile = kTcMI x kTcNJ m16n8 tiles.
// Shared-memory tiles of fp16 bits: A [kTcBM][kTcSmemStride] (activations, row = m, col = k)
// and, for the salient columns, W [kTcBN][kTcSmemStride] (row = n, col = k); the row stride of
// kTcBK + 8 halves (20 words) puts the 8 rows a fragment load touches in 8 distinct bank quads.
constexpr int kTcBM = 64, kTcBN = 64, kTcBK = 32;
constexpr int kTcWarpsM = 2, kTcWarpsN = 2, kTcThreads = 32 * kTcWarpsM * kTcWarpsN;
constexpr int kTcWarpTileM = kTcBM / kTcWarpsM, kTcWarpTileN = kTcBN / kTcWarpsN;
constexpr int kTcMI = kTcWarpTileM / 16, kTcNJ = kTcWarpTileN / 8;
constexpr int kTcSmemStride = kTcBK + 8;
// Staging: kTcStageIters elements per thread per tile (A: kTcBM x kTcBK, W: kTcBN x kTcBK).
constexpr int kTcStageIters = kTcBM * kTcBK / kTcThreads;
static_assert(kTcBK == 32, "staging maps one warp to one 32-column tile row");
static_assert(kTcBM == kTcBN, "A and W tiles share the staging map");
static_assert(kTcThreads % kTcBK == 0 && (kTcBM * kTcBK) % kTcThreads == 0, "staging map");
static_assert(kTcWarpTileM % 16 == 0 && kTcWarpTileN % 8 == 0, "warp tile");

struct RowCol {
  int row, col;
};

// mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 fragments (PTX ISA, "Matrix Fragments for
// mma.m16n8k16 with floating point type"), lane = 0..31, g = lane / 4, t = lane % 4.
// A (16 x 16, m x k): element e = 0..7 of a lane; register e / 2 holds elements (e & ~1, e | 1)
// in its (low, high) 16 bits: row g + 8 * ((e / 2) & 1), col 2t + (e & 1) + 8 * (e / 4).
QEXPORT_HD RowCol MmaAElem(int lane, int e) {
  return RowCol{(lane >> 2) + 8 * ((e >> 1) & 1), 2 * (lane & 3) + (e & 1) + 8 * (e >> 2)};
}
// B (16 x 8, k x n): element e = 0..3; register e / 2: row (k) 2t + (e & 1) + 8 * (e / 2),
// col (n) g.
QEXPORT_HD RowCol MmaBElem(int lane, int e) {
  return RowCol{2 * (lane & 3) + (e & 1) + 8 * (e >> 1), lane >> 2};
}
// C/D (16 x 8, fp32): element e = 0..3: row g + 8 * (e / 2), col 2t + (e & 1).
QEXPORT_HD RowCol MmaCElem(int lane, int e) {
  return RowCol{(lane >> 2) + 8 * (e >> 1), 2 * (lane & 3) + (e & 1)};
}

// Staging map of a tile (kTcBM or kTcBN rows x kTcBK columns): thread tid, step it handles
// (TcStageRow, TcStageCol). A warp covers one row's kTcBK consecutive columns (coalesced global
// reads, conflict-free shared stores), and a thread's rows are the same for every K tile.
QEXPORT_HD int TcStageRow(int tid, int it) { return (tid + kTcThreads * it) / kTcBK; }
QEXPORT_HD int TcStageCol(int tid) { return tid % kTcBK; }
// Row sums of x * r2 over a staged binary K tile: thread tid adds kTcRowSumCols columns of
// tile row TcRowSumRow(tid) starting at TcRowSumCol(tid); the 2 threads of a row are adjacent
// lanes (combined with one shuffle).
constexpr int kTcRowSumCols = kTcBK / 2;
static_assert(kTcThreads == 2 * kTcBM, "two threads per tile row for the row sums");
QEXPORT_HD int TcRowSumRow(int tid) { return tid >> 1; }
QEXPORT_HD int TcRowSumCol(int tid) { return (tid & 1) * kTcRowSumCols; }
// First tile row / column of a warp's sub-tile.
QEXPORT_HD int TcWarpRow(int warp) { return (warp / kTcWarpsN) * kTcWarpTileM; }
QEXPORT_HD int TcWarpCol(int warp) { return (warp % kTcWarpsN) * kTcWarpTileN; }

// fp16 bits of r2 for binary column c: r2[c], 1.0 when r2 is absent, 0 for a padding column
// (c >= kb), so a padded column contributes 0 whatever its sign bit says.
QEXPORT_HD uint16_t R2HalfBits(const uint16_t* r2, int64_t c, int64_t kb) {
  return c < kb ? (r2 ? r2[c] : static_cast<uint16_t>(0x3c00u)) : static_cast<uint16_t>(0);
}

// Byte `byte` of row o of sign_packed, 0 outside the row (byte >= sign_bytes) or the matrix.
QEXPORT_HD uint8_t SignByteOr0(const uint8_t* sign_packed, int64_t o, int64_t n, int64_t byte,
                               int64_t sign_bytes) {
  return (o < n && byte < sign_bytes) ? sign_packed[o * sign_bytes + byte] : 0;
}

// A B-fragment register of the binary part: the r2 pair (fp16 bits of binary columns
// kpos, kpos + 1 of the K tile, low half first) with each half's sign bit flipped where the
// column's sign bit in `sign_word` (bit i = column i of the tile, i.e. the tile's 4 packed
// bytes little-endian) is 0: B[c][n] = sign[n][c] * r2[c], exact in fp16. kpos even, < 31.
QEXPORT_HD uint32_t BinaryBReg(uint32_t sign_word, int kpos, uint32_t r2_pair) {
  const uint32_t lo = ((sign_word >> kpos) & 1u) ^ 1u, hi = ((sign_word >> (kpos + 1)) & 1u) ^ 1u;
  return r2_pair ^ ((lo << 15) | (hi << 31));
}

}  // namespace unpack
}  // namespace bml
}  // namespace qexport
