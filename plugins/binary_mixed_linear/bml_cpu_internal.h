// What the files of the fast BinaryMixedLinear CPU kernel share (private to the kernel): the
// packed weights, their index helpers and the entry points of the two algorithms. Files:
//   bml_cpu_pack.cpp      PackWeights: layout 1 -> PackedWeights (below)
//   bml_cpu_lut.cpp       RunLut: lookup tables per row of X (small and medium M)
//   bml_cpu_gemm.cpp      RunGemm: dequantized panels + GEMM (large M)
//   bml_cpu_dispatch.cpp  the cost model choosing between them, ISA resolution, RunCpuPacked
//   bml_cpu_scratch.h     per-thread scratch buffers
//   bml_cpu_kernels*.{h,cpp,inc}  the per-ISA inner loops both algorithms call
// fp32 accumulation, or exact integer sums over the AVX-512 path's integer tables; design and
// measurements in docs/kernels.md. Inputs or parameters that are not finite go to the plain
// kernel (RunCpuPlain, bml_cpu.cpp), where no reordering can turn an infinity into NaN.
//
// Weights, packed once from layout 1 (PackWeights; the ORT glue caches them for constant
// initializers):
// - output rows in blocks of 16 (N padded with zero rows to a whole block), blocks in groups
//   of 8, the last group holding what is left;
// - binary part: per group, per dword q of the sign rows (binary columns 32q..32q+31), the
//   group's blocks' 64-byte lines of 16 rows x the layout-1 bytes 4q..4q+3
//   (bml_cpu_kernels.h), in row-major or byte-major order as the ISA path reads them
//   (LineByte): one 64-byte load gives 16 rows x 32 signs, and a group is read as one stream;
// - salient part: the same order over the 4-bit codes, each group's columns padded to a
//   multiple of 8 so that no dword straddles two groups;
// - fp16 parameters as fp32, per-group scales as [group][N] rows.
// The bytes live in a HugePageBuffer (plugins/common/qexport_arena.h): transparent huge pages.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "binary_mixed_linear/bml_cpu.h"
#include "binary_mixed_linear/bml_cpu_kernels.h"
#include "qexport_arena.h"
#include "qexport_fp16.h"
#include "qexport_parallel.h"

namespace qexport {
namespace bml {

struct PackedWeights {
  int64_t k = 0, n = 0, s = 0, kb = 0, group_size = 0, groups = 0;
  int64_t nblk = 0, npad = 0, ngrp = 0;  // blocks of 16 rows, npad = 16 nblk, groups of 8
  int64_t kb_dw = 0;                  // ceil(kb / 32): dwords per sign row
  HugePageBuffer bytes;               // wb and ws
  uint8_t* wb = nullptr;              // [ngrp][kb_dw][<= 8 blocks][16 rows][4 bytes]
  std::vector<int32_t> bin_chan;      // [kb] input channel of each binary column
  std::vector<uint16_t> bin_mask;     // [ceil(k / 16)] bit i: channel 16 b + i is binary
  std::vector<float> r2;              // [kb]; empty: all ones
  std::vector<float> rs, ro;          // [npad]
  std::vector<float> pos, neg;        // [npad]: ro + rs, ro - rs (a dequantized sign)
  int64_t s_dw = 0;                   // dwords per row of codes (groups padded to 8 codes)
  uint8_t* ws = nullptr;              // [ngrp][s_dw][<= 8 blocks][16 rows][4 bytes]
  std::vector<int32_t> slot_chan;     // [8 s_dw] input channel of each code slot; -1: pad
  std::vector<int32_t> slot_of;       // [s] code slot of each salient column
  bool slots_dense = true;            // slot_of[j] == j: no padding before the last group
  std::vector<int64_t> group_dw;      // [groups + 1] first dword of each group
  std::vector<float> sscale, szero;   // [groups][npad]: scale, scale * zero
  bool has_zero = false;              // some zero point is not 0
  std::vector<float> bias;            // [npad]; empty: none
  bool finite = true;                 // every fp16 parameter finite
  bool byte_major = false;            // line order of wb and ws (LineByte): the ISA path's
};

using detail::CpuKernels;
using detail::kBlockLine;
using detail::kGroupBlocks;
using detail::kGroupLine;
using detail::kNibbles;
using detail::kRowBlock;
using detail::kSplitSlack;

// Bytes per dword of the group of block `blk` of `nblk` (all groups but the last are full).
inline int64_t GroupLine(int64_t blk, int64_t nblk) {
  const int64_t first = blk / kGroupBlocks * kGroupBlocks;
  return std::min<int64_t>(kGroupBlocks, nblk - first) * kBlockLine;
}

// Offset of block `blk`'s line (dword 0) in a [group][dword][block][64-byte line] array with
// `dw` dwords per row (the groups before it are full); dword q of the block is q * GroupLine
// further.
inline int64_t BlockOffset(int64_t blk, int64_t dw) {
  return (blk / kGroupBlocks) * dw * kGroupLine + (blk % kGroupBlocks) * kBlockLine;
}

// Offset of byte e (0..3) of a dword of row r (0..15) of a block in the block's 64-byte line:
// row-major lines hold each row's 4 bytes together (16 rows x 4 bytes), byte-major lines each
// byte position's 16 rows together (4 x 16 rows; CpuKernels::byte_major).
inline int64_t LineByte(int64_t r, int64_t e, bool byte_major) {
  return byte_major ? kRowBlock * e + r : 4 * r + e;
}

// The sizes of a call, checked before anything is read.
inline Status CheckSizes(const Args& a) {
  if (a.m < 0 || a.k < 0 || a.n < 0 || a.s < 0 || a.s > a.k || a.group_size < 0)
    return Status::Error("bad sizes M=" + std::to_string(a.m) + " K=" + std::to_string(a.k) +
                         " N=" + std::to_string(a.n) + " S=" + std::to_string(a.s) +
                         " G=" + std::to_string(a.group_size));
  return Status::Ok();
}

// Activation element <-> fp32 (T: float, or uint16_t fp16 bits).
inline float LoadF(const float* p, int64_t i) { return p[i]; }
inline float LoadF(const uint16_t* p, int64_t i) { return HalfToFloat(p[i]); }
inline void StoreF(float* p, int64_t i, float v) { p[i] = v; }
inline void StoreF(uint16_t* p, int64_t i, float v) { p[i] = FloatToHalf(v); }

// The kernels of an ISA path (kAuto: the best the CPU has); null when not available here.
const CpuKernels* KernelsFor(Isa isa);

// The two algorithms, on sizes and pointers already checked (RunCpuPacked), for T = float or
// uint16_t (fp16 bits). Tables: bml_cpu_lut.cpp; dequantize + GEMM: bml_cpu_gemm.cpp (needs
// kern.gemm).
template <typename T>
Status RunLut(const Args& a, const PackedWeights& p, const CpuKernels& kern,
              const ParallelFor& par);
template <typename T>
Status RunGemm(const Args& a, const PackedWeights& p, const CpuKernels& kern,
               const ParallelFor& par);

}  // namespace bml
}  // namespace qexport
