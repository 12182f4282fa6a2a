// Inner loops of the BinaryMixedLinear lookup-table kernel, one table per instruction set
// (bml_cpu_kernels_{portable,avx2,avx512}.cpp; the x86 ones are compiled with their own
// -m flags and only called after __builtin_cpu_supports says the CPU has them). Internal to
// the CPU kernel: see bml_cpu_lut.cpp for the data layout.
#pragma once

#include <cstdint>

namespace qexport {
namespace bml {
namespace detail {

constexpr int kRowBlock = 16;  // output rows per block: one 16-lane fp32 vector
constexpr int kMaxBlocks = 4;  // row blocks one lut_dot call handles (64 rows)

struct CpuKernels {
  // For i < nblk, r < 16: out[16 i + r] += scale[16 i + r] (1 when null) *
  //   sum_{b < nbytes} lut[2b][w_i[b][r] & 15] + lut[2b + 1][w_i[b][r] >> 4]
  // where w_i = w + i * blk_stride is [nbytes][16] bytes and lut is [2 * nbytes][16] floats.
  void (*lut_dot)(const uint8_t* w, int64_t blk_stride, int nblk, const float* lut,
                  int64_t nbytes, float* out, const float* scale);
  // lut[g][i] = sum_{t < 4} (bit t of i ? +1 : -1) * x[4g + t], for g < ngroups.
  void (*sign_lut)(const float* x, int64_t ngroups, float* lut);
  // lut[j][q] = q * x[j], for j < count, q < 16.
  void (*code_lut)(const float* x, int64_t count, float* lut);
};

const CpuKernels& KernelsPortable();
const CpuKernels* KernelsAvx2();    // null when not compiled in (non-x86 build)
const CpuKernels* KernelsAvx512();  // null when not compiled in

}  // namespace detail
}  // namespace bml
}  // namespace qexport
