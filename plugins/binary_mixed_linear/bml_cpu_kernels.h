// Inner loops of the BinaryMixedLinear CPU kernel, one table per instruction set
// (bml_cpu_kernels_{portable,avx2,avx512}.cpp; the x86 ones are compiled with their own
// -m flags and only called after __builtin_cpu_supports says the CPU has them). Internal to
// the CPU kernel: see bml_cpu_internal.h for the data layout.
//
// Packed weight layout every path reads (built by PackWeights): output rows in blocks of 16,
// blocks in groups of 8 (the last group holds what is left: `width` blocks, 1..8); per
// group, per dword q of a row's packed bits, the group's blocks' lines of 64 bytes (16 rows
// x 4 bytes, the layout-1 bytes 4q..4q+3 of each row) follow each other: byte e of dword q
// of row r of block i of the group is at
//   group_base + q * line + i * kBlockLine + 4 * r + e,   line = width * kBlockLine
// (row-major lines; a byte-major path, CpuKernels::byte_major, has 16 * e + r instead).
// So a group (128 output rows) is one sequential stream, and one 64-byte load gives 16 rows
// x 32 sign bits (or 8 four-bit codes): nibble j of a dword is its bits 4j..4j+3.
#pragma once

#include <cstdint>

namespace qexport {
namespace bml {
namespace detail {

constexpr int kRowBlock = 16;    // output rows per block: one 16-lane fp32 vector
constexpr int kGroupBlocks = 8;  // blocks per group (the last one: what is left)
constexpr int64_t kBlockLine = 4 * kRowBlock;                  // bytes: 16 rows x 1 dword
constexpr int64_t kGroupLine = kGroupBlocks * kBlockLine;      // bytes per dword of a full group
constexpr int kNibbles = 8;      // 4-bit fields per dword: lookups per dword and row
constexpr int kSplitSlack = 16;  // floats split_row may write past its outputs' ends

// Costs of the two paths (CpuKernels::gemm_costs). GEMM: (M + dequant) steps per input
// channel and 16 output rows (dequantizing is once per call). Tables, per row of X:
// build_binary (build_salient) per binary (salient) channel to build the tables, then per
// 16 output rows `lookup` per 4-bit field read (8 per packed dword, padding included) and
// `epilogue`. The GEMM serves calls with M >= min_rows that it does in less.
struct GemmCosts {
  float lookup, build_binary, build_salient, epilogue, dequant;
  int min_rows;
};

struct CpuKernels {
  // Order of the bytes within a block's 64-byte line that this path's loops read (PackWeights
  // packs for it): false: row-major, 16 rows x the 4 bytes of a dword (byte e of row r at
  // 4 r + e, the layout above); true: byte-major, 4 x the 16 rows' byte e (at 16 e + r), so
  // that a 16-byte lane holds one nibble position of 16 rows (the AVX2 path's vpshufb).
  bool byte_major;
  // Whether no value of x[0, count) is an infinity or NaN (fp32, or fp16 bits when half).
  bool (*all_finite)(const void* x, int64_t count, bool half);

  // --- lookup tables
  // A path keeps its tables in a format of its own, lut_dw_floats floats per packed dword
  // (8 tables of 16 entries): fp32 entries (128 floats), or the AVX-512 path's integer
  // entries as 3 byte digits (96 floats' room; bml_cpu_kernels_avx512.cpp). A builder
  // returns the factor `tscale` that turns its section's entries into values (1 for fp32).
  int64_t lut_dw_floats;
  // For i < nblk (<= kGroupBlocks), r < 16: out[16 i + r] += scale[16 i + r] (1 when null) *
  //   tscale * sum_{q < ndw, j < 8} lut[8 q + j][nibble j of the dword of row r, block i at q]
  // where w points at a group's line of dword 0 (layout above), dword q at w + q * line,
  // and lut the tables of those ndw dwords, all from one builder call (tscale: its result).
  // One group per call: one stream from memory, each table load serving 8 blocks.
  void (*lut_dot)(const uint8_t* w, int64_t line, int nblk, const float* lut, int64_t ndw,
                  float* out, const float* scale, float tscale);
  // Splits a row of X by channel kind, in channel order: xb[c] = x[c-th binary channel] *
  // r2[c] (r2 null: 1), xs[j] = x[j-th salient channel]. bin_mask[b] bit i: channel 16 b + i
  // is binary (ceil(k / 16) masks). Both outputs may be written up to kSplitSlack floats
  // past their ends.
  void (*split_row)(const float* x, int64_t k, const uint16_t* bin_mask, const float* r2,
                    float* xb, float* xs);
  // The tables of ndw dwords of binary channels: table g < 8 ndw, entry i < 16:
  //   sum_{t < 4} (bit t of i ? +1 : -1) * x[4g + t]  (divided by the returned tscale).
  float (*sign_lut)(const float* x, int64_t ndw, float* lut);
  // The tables of ndw dwords of 4-bit codes: table j < 8 ndw, entry q < 16: q * x[j]
  //   (divided by the returned tscale).
  float (*code_lut)(const float* x, int64_t ndw, float* lut);

  // --- dequantize + GEMM path (large M, docs/kernels.md); null pointers: tables only.
  // Panel of W^T for gemm_nr output rows: panel[c * gemm_nr + o], c < K (input channel),
  // o < gemm_nr (output row within the panel).
  int gemm_nr;
  // Cost model choosing between the paths (bml_cpu_dispatch.cpp UseGemm), fit to measurements
  // on the path (docs/kernels.md), in units of one GEMM step (one input channel x 16
  // output rows x one row of X).
  GemmCosts gemm_costs;
  // The binary columns of one 16-row block: for c < kb, r < 16,
  //   panel[chan[c] * ld + r] = r2[c] (1 when null) * (bit c of row r ? pos[r] : neg[r])
  // with w the block's line of dword 0 (dword q of row r at w + q * line + 4 r).
  void (*dequant_signs)(const uint8_t* w, int64_t line, int64_t kb, const int32_t* chan,
                        const float* r2, const float* pos, const float* neg, float* panel,
                        int64_t ld);
  // The salient codes of one 16-row block, one group: for slot j < 8 ndw with chan[j] >= 0,
  //   panel[chan[j] * ld + r] = scale[r] * code(j, r) - szero[r]   (szero = scale * zero)
  // with code j of row r nibble j % 8 of dword j / 8 (w: as for dequant_signs).
  void (*dequant_codes)(const uint8_t* w, int64_t line, int64_t ndw, const int32_t* chan,
                        const float* scale, const float* szero, float* panel, int64_t ld);
  // c[m * ldc + o] = sum_{c < k} a[m * lda + c] * panel[c * gemm_nr + o] + bias[o] (0 when
  // null), for m < rows (any count) and o < cols (<= gemm_nr).
  void (*gemm)(const float* a, int64_t lda, int64_t rows, const float* panel, int64_t k,
               const float* bias, float* c, int64_t ldc, int cols);
};

const CpuKernels& KernelsPortable();
const CpuKernels* KernelsAvx2();    // null when not compiled in (non-x86 build)
const CpuKernels* KernelsAvx512();  // null when not compiled in

}  // namespace detail
}  // namespace bml
}  // namespace qexport
