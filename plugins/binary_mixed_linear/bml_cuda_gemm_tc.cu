// qexport::BinaryMixedLinear CUDA kernel for larger M with fp16 activations: GemmTcKernel, on
// the tensor cores (sm_80+; docs/gpu.md, docs/format.md layout 1). Launched by bml_cuda.cu's
// Launch through LaunchGemmTc.
//
// mma.sync m16n8k16 (fp16 in, fp32 accumulate), 64x64 block tile, 4 warps of 32x32, K step 32.
// Binary part: A = the gathered raw fp16 activations, B = sign * r2 built in registers from the
// staged packed sign bytes (the r2 pair's fp16 sign bits flipped: exact), so the MMA sums
// sign*r2*x exactly; then acc = row_scale * acc + row_offset * sum_c(x*r2) (fp32 row sums from
// the staging). Salient part: A = gathered activations, B = (q - zero) * scale rounded once to
// fp16, dequantized into a shared-memory tile. Index math in bml_unpack.h (host-tested, and the
// whole kernel emulated step for step on the host: tests/cpp/unpack_capi.cpp qx_tc_emulate).
//
// Size: GemmTcKernel is one kernel body of ~140 lines: the staging of A, the sign bytes, r2 and
// the salient tile, the MMA loop and the epilogue share the block's shared-memory tiles and the
// warp's accumulator registers across one K loop, and its steps map one to one onto the host
// emulation that tests it (qx_tc_emulate), so it is kept whole.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <string>

#include "binary_mixed_linear/bml_cuda.cuh"
#include "binary_mixed_linear/bml_cuda_internal.cuh"
#include "binary_mixed_linear/bml_unpack.h"

namespace qexport {
namespace bml {
namespace cuda {
namespace detail {
namespace {

namespace up = ::qexport::bml::unpack;

// D += A * B on the tensor cores: mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32.
// Fragment layouts: up::MmaAElem / MmaBElem / MmaCElem. sm_80+ only (the launcher checks the
// device; an older target would trap).
__device__ __forceinline__ void Mma16816(float (&d)[4], const uint32_t (&af)[4], uint32_t b0,
                                         uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(af[0]), "r"(af[1]), "r"(af[2]), "r"(af[3]), "r"(b0), "r"(b1));
#else
  (void)d; (void)af; (void)b0; (void)b1;
  __trap();
#endif
}

__device__ __forceinline__ uint32_t Lds32(const uint16_t* p) {
  return *reinterpret_cast<const uint32_t*>(p);
}

// A fragments of the warp's kTcMI m16 tiles for k16 step kk of the staged A tile.
__device__ __forceinline__ void LoadA(uint32_t (&af)[up::kTcMI][4],
                                      const uint16_t (*as)[up::kTcSmemStride], int wrow,
                                      int kk, int lane) {
#pragma unroll
  for (int i = 0; i < up::kTcMI; ++i)
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const up::RowCol rc = up::MmaAElem(lane, 2 * r);  // elements 2r, 2r + 1: adjacent cols
      af[i][r] = Lds32(&as[wrow + 16 * i + rc.row][16 * kk + rc.col]);
    }
}

// fp16 activations only: y = row_scale * sum_c sign*r2*x + row_offset * sum_c r2*x
//                            + sum_j w_sal * x + bias, fp32 accumulation, one rounding to fp16.
// Every global read is predicated (rows >= m, outputs >= n, binary columns >= kb, salient
// columns >= s read nothing and stage zeros).
__global__ void __launch_bounds__(up::kTcThreads) GemmTcKernel(CudaArgs a) {
  __shared__ __align__(16) uint16_t as[up::kTcBM][up::kTcSmemStride];
  __shared__ __align__(16) uint16_t ws[up::kTcBN][up::kTcSmemStride];
  __shared__ __align__(16) uint8_t sgn[up::kTcBN][up::kTcBK / 8];
  __shared__ __align__(16) uint16_t r2s[up::kTcBK];
  __shared__ float sumxb[up::kTcBM];

  const int64_t m = a.m, n = a.n, k = a.k, s = a.s, kb = k - s;
  const int64_t sign_bytes = up::SignBytes(k, s), sal_bytes = up::SalientBytes(s);
  const int64_t groups = up::NumGroups(s, a.group_size);
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * up::kTcBM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * up::kTcBN;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wrow = up::TcWarpRow(warp), wcol = up::TcWarpCol(warp);
  const int scol = up::TcStageCol(tid);
  const uint16_t* __restrict__ x = static_cast<const uint16_t*>(a.x);

  float acc[up::kTcMI][up::kTcNJ][4];
#pragma unroll
  for (int i = 0; i < up::kTcMI; ++i)
#pragma unroll
    for (int j = 0; j < up::kTcNJ; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

  if (kb > 0) {
    // Row sums of x * r2 over the binary columns (fp32), from the staged tiles: two threads per
    // tile row, each the same row and columns for every K tile.
    float psum = 0.0f;
    const int sum_row = up::TcRowSumRow(tid), sum_col = up::TcRowSumCol(tid);

    for (int64_t c0 = 0; c0 < kb; c0 += up::kTcBK) {
      const int64_t c = c0 + scol;
      const bool cin = c < kb;
      const int64_t ch = cin ? static_cast<int64_t>(__ldg(a.binary_channel + c)) : 0;
#pragma unroll 4
      for (int it = 0; it < up::kTcStageIters; ++it) {
        const int rl = up::TcStageRow(tid, it);
        const int64_t row = m0 + rl;
        as[rl][scol] = (cin && row < m) ? __ldg(x + row * k + ch) : uint16_t{0};
      }
      for (int i = tid; i < up::kTcBN * (up::kTcBK / 8); i += up::kTcThreads) {
        const int nl = i / (up::kTcBK / 8), b = i % (up::kTcBK / 8);
        sgn[nl][b] = up::SignByteOr0(a.sign_packed, n0 + nl, n, c0 / 8 + b, sign_bytes);
      }
      if (tid < up::kTcBK) r2s[tid] = up::R2HalfBits(a.r2, c0 + tid, kb);
      __syncthreads();

#pragma unroll
      for (int cc = 0; cc < up::kTcRowSumCols; cc += 2) {
        const float2 xv = __half22float2(__halves2half2(__ushort_as_half(as[sum_row][sum_col + cc]),
                                                        __ushort_as_half(as[sum_row][sum_col + cc + 1])));
        const float2 rv = __half22float2(__halves2half2(__ushort_as_half(r2s[sum_col + cc]),
                                                        __ushort_as_half(r2s[sum_col + cc + 1])));
        psum += xv.x * rv.x;
        psum += xv.y * rv.y;
      }

      uint32_t words[up::kTcNJ];  // the tile's 32 sign bits of each n8 tile's row g
#pragma unroll
      for (int j = 0; j < up::kTcNJ; ++j)
        words[j] = *reinterpret_cast<const uint32_t*>(&sgn[wcol + 8 * j + up::MmaBElem(lane, 0).col][0]);
#pragma unroll
      for (int kk = 0; kk < up::kTcBK / 16; ++kk) {
        uint32_t af[up::kTcMI][4];
        LoadA(af, as, wrow, kk, lane);
        const int k_lo = 16 * kk + up::MmaBElem(lane, 0).row;  // elements 0, 1
        const int k_hi = 16 * kk + up::MmaBElem(lane, 2).row;  // elements 2, 3
        const uint32_t r2_lo = Lds32(&r2s[k_lo]), r2_hi = Lds32(&r2s[k_hi]);
#pragma unroll
        for (int j = 0; j < up::kTcNJ; ++j) {
          const uint32_t b0 = up::BinaryBReg(words[j], k_lo, r2_lo);
          const uint32_t b1 = up::BinaryBReg(words[j], k_hi, r2_hi);
#pragma unroll
          for (int i = 0; i < up::kTcMI; ++i) Mma16816(acc[i][j], af[i], b0, b1);
        }
      }
      __syncthreads();
    }
    psum += __shfl_xor_sync(0xffffffffu, psum, 1);  // the row's other half (adjacent lane)
    if ((tid & 1) == 0) sumxb[sum_row] = psum;
    __syncthreads();
#pragma unroll
    for (int i = 0; i < up::kTcMI; ++i)
#pragma unroll
      for (int j = 0; j < up::kTcNJ; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const up::RowCol rc = up::MmaCElem(lane, e);
          const int64_t o = n0 + wcol + 8 * j + rc.col;
          if (o < n)
            acc[i][j][e] = Half(a.row_scale, o) * acc[i][j][e] +
                           Half(a.row_offset, o) * sumxb[wrow + 16 * i + rc.row];
        }
  }

  for (int64_t j0 = 0; j0 < s; j0 += up::kTcBK) {
    const int64_t jc = j0 + scol;
    const bool jin = jc < s;
    const int64_t ch = jin ? up::ClampChannel(__ldg(a.salient_idx + jc), k) : 0;
#pragma unroll 4
    for (int it = 0; it < up::kTcStageIters; ++it) {
      const int rl = up::TcStageRow(tid, it);
      const int64_t row = m0 + rl, o = n0 + rl;
      as[rl][scol] = (jin && row < m) ? __ldg(x + row * k + ch) : uint16_t{0};
      ws[rl][scol] = (jin && o < n) ? up::SalientWeightHalfBits(a.salient_packed + o * sal_bytes,
                                                                a.salient_scale + o * groups,
                                                                a.salient_zero + o * groups, jc,
                                                                s, a.group_size)
                                    : uint16_t{0};
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < up::kTcBK / 16; ++kk) {
      uint32_t af[up::kTcMI][4];
      LoadA(af, as, wrow, kk, lane);
#pragma unroll
      for (int j = 0; j < up::kTcNJ; ++j) {
        const up::RowCol lo = up::MmaBElem(lane, 0), hi = up::MmaBElem(lane, 2);
        const uint32_t b0 = Lds32(&ws[wcol + 8 * j + lo.col][16 * kk + lo.row]);
        const uint32_t b1 = Lds32(&ws[wcol + 8 * j + hi.col][16 * kk + hi.row]);
#pragma unroll
        for (int i = 0; i < up::kTcMI; ++i) Mma16816(acc[i][j], af[i], b0, b1);
      }
    }
    __syncthreads();
  }

  uint16_t* y = static_cast<uint16_t*>(a.y);
#pragma unroll
  for (int i = 0; i < up::kTcMI; ++i)
#pragma unroll
    for (int j = 0; j < up::kTcNJ; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const up::RowCol rc = up::MmaCElem(lane, e);
        const int64_t row = m0 + wrow + 16 * i + rc.row, o = n0 + wcol + 8 * j + rc.col;
        if (row >= m || o >= n) continue;
        float out = acc[i][j][e];
        if (a.bias) out += __ldg(a.bias + o);
        Store(y, row * n + o, out);
      }
}

}  // namespace

Status LaunchGemmTc(const CudaArgs& a, cudaStream_t stream, const std::string& shape) {
  const int64_t mt = up::CeilDiv(a.m, up::kTcBM), nt = up::CeilDiv(a.n, up::kTcBN);
  if (mt > 0x7fffffff || nt > 65535)
    return Status::Error("problem too large for the tensor-core GEMM grid " + shape);
  dim3 grid(static_cast<unsigned>(mt), static_cast<unsigned>(nt));
  GemmTcKernel<<<grid, up::kTcThreads, 0, stream>>>(a);
  QEXPORT_CUDA_CHECK(cudaGetLastError(), "launch of the tensor-core GEMM kernel", shape);
  return Status::Ok();
}

}  // namespace detail
}  // namespace cuda
}  // namespace bml
}  // namespace qexport
