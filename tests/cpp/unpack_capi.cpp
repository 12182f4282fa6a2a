// ctypes entry points into plugins/binary_mixed_linear/bml_unpack.h (the index/unpack logic the
// CUDA kernels use), compiled with the host compiler by tests/test_gpu_unpack.py and compared
// with the Python reference (qexport/ops/binary_mixed_linear/packing.py). No CUDA needed.
#include <cstdint>
#include <cstring>
#include <vector>

#include "binary_mixed_linear/bml_unpack.h"

namespace up = qexport::bml::unpack;

namespace {

constexpr int kWarps = up::kTcThreads / 32;

// One warp's mma.sync.m16n8k16.row.col.f32.f16.f16.f32, emulated: the per-lane fragments are
// scattered into A (16x16), B (16x8) and C (16x8) with MmaAElem / MmaBElem / MmaCElem (which
// tests/test_gpu_unpack.py checks against the PTX ISA table on its own), D = A B + C in fp32.
void EmuMma(float d[32][4], const uint32_t a[32][4], const uint32_t b[32][2]) {
  float am[16][16], bm[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    for (int e = 0; e < 8; ++e) {
      const up::RowCol rc = up::MmaAElem(lane, e);
      am[rc.row][rc.col] =
          up::HalfBitsToFloat(static_cast<uint16_t>(a[lane][e >> 1] >> (16 * (e & 1))));
    }
    for (int e = 0; e < 4; ++e) {
      const up::RowCol rc = up::MmaBElem(lane, e);
      bm[rc.row][rc.col] =
          up::HalfBitsToFloat(static_cast<uint16_t>(b[lane][e >> 1] >> (16 * (e & 1))));
    }
  }
  for (int lane = 0; lane < 32; ++lane)
    for (int e = 0; e < 4; ++e) {
      const up::RowCol rc = up::MmaCElem(lane, e);
      float sum = d[lane][e];
      for (int kk = 0; kk < 16; ++kk) sum += am[rc.row][kk] * bm[kk][rc.col];
      d[lane][e] = sum;
    }
}

uint32_t Pair(const uint16_t* p) { return static_cast<uint32_t>(p[0]) | (static_cast<uint32_t>(p[1]) << 16); }

}  // namespace

extern "C" {

// out[c] = input channel of binary column c, c < k - s.
void qx_binary_channels(const int32_t* salient_idx, int64_t s, int64_t k, int64_t* out) {
  for (int64_t c = 0; c < k - s; ++c) out[c] = up::BinaryChannel(c, salient_idx, s, k);
}
// out[n * kb + c] = +1 / -1 of sign_packed [n, ceil(kb/8)].
void qx_unpack_signs(const uint8_t* packed, int64_t n, int64_t kb, float* out) {
  const int64_t bytes = up::CeilDiv(kb, 8);
  for (int64_t r = 0; r < n; ++r)
    for (int64_t c = 0; c < kb; ++c) out[r * kb + c] = up::SignValue(packed + r * bytes, c);
}
// out[n * s + j] = code of salient column j.
void qx_unpack_nibbles(const uint8_t* packed, int64_t n, int64_t s, int32_t* out) {
  const int64_t bytes = up::SalientBytes(s);
  for (int64_t r = 0; r < n; ++r)
    for (int64_t j = 0; j < s; ++j) out[r * s + j] = up::Nibble(packed + r * bytes, j);
}
// Group of each salient column, and the group count.
int64_t qx_groups(int64_t s, int64_t group_size, int64_t* group_of) {
  for (int64_t j = 0; j < s; ++j) group_of[j] = up::GroupOf(j, s, group_size);
  return up::NumGroups(s, group_size);
}
// Dequantized salient weights [n, s].
void qx_salient_weights(const uint8_t* packed, const uint16_t* scale, const uint8_t* zero,
                        int64_t n, int64_t s, int64_t group_size, float* out) {
  const int64_t bytes = up::SalientBytes(s), groups = up::NumGroups(s, group_size);
  for (int64_t r = 0; r < n; ++r)
    for (int64_t j = 0; j < s; ++j)
      out[r * s + j] = up::SalientWeight(packed + r * bytes, scale + r * groups,
                                         zero + r * groups, j, s, group_size);
}
void qx_half_to_float(const uint16_t* h, int64_t count, float* out) {
  for (int64_t i = 0; i < count; ++i) out[i] = up::HalfBitsToFloat(h[i]);
}
void qx_float_to_half(const float* f, int64_t count, uint16_t* out) {
  for (int64_t i = 0; i < count; ++i) out[i] = up::FloatToHalfBits(f[i]);
}


// mma.sync.m16n8k16 fragment maps: out_a[lane][e] = (row, col) for e < 8, out_b for e < 4 as
// (k, n), out_c for e < 4 as (row, col); each int32 [32][E][2].
void qx_mma_layout(int32_t* out_a, int32_t* out_b, int32_t* out_c) {
  for (int lane = 0; lane < 32; ++lane) {
    for (int e = 0; e < 8; ++e) {
      const up::RowCol rc = up::MmaAElem(lane, e);
      out_a[(lane * 8 + e) * 2] = rc.row;
      out_a[(lane * 8 + e) * 2 + 1] = rc.col;
    }
    for (int e = 0; e < 4; ++e) {
      up::RowCol rc = up::MmaBElem(lane, e);
      out_b[(lane * 4 + e) * 2] = rc.row;
      out_b[(lane * 4 + e) * 2 + 1] = rc.col;
      rc = up::MmaCElem(lane, e);
      out_c[(lane * 4 + e) * 2] = rc.row;
      out_c[(lane * 4 + e) * 2 + 1] = rc.col;
    }
  }
}

// Tile geometry: [BM, BN, BK, threads, MI, NJ, smem stride, stage iters].
void qx_tc_geometry(int32_t* out) {
  const int32_t g[8] = {up::kTcBM, up::kTcBN, up::kTcBK, up::kTcThreads, up::kTcMI, up::kTcNJ,
                        up::kTcSmemStride, up::kTcStageIters};
  std::memcpy(out, g, sizeof g);
}

// Staging maps: stage_row[tid][it], stage_col[tid], rowsum_row[tid], rowsum_col[tid],
// warp_row[warp], warp_col[warp].
void qx_tc_maps(int32_t* stage_row, int32_t* stage_col, int32_t* rowsum_row, int32_t* rowsum_col,
                int32_t* warp_row, int32_t* warp_col) {
  for (int tid = 0; tid < up::kTcThreads; ++tid) {
    for (int it = 0; it < up::kTcStageIters; ++it)
      stage_row[tid * up::kTcStageIters + it] = up::TcStageRow(tid, it);
    stage_col[tid] = up::TcStageCol(tid);
    rowsum_row[tid] = up::TcRowSumRow(tid);
    rowsum_col[tid] = up::TcRowSumCol(tid);
  }
  for (int w = 0; w < kWarps; ++w) {
    warp_row[w] = up::TcWarpRow(w);
    warp_col[w] = up::TcWarpCol(w);
  }
}

// out[i] = BinaryBReg(words[i], kpos[i], r2_pairs[i]).
void qx_binary_b_reg(const uint32_t* words, const int32_t* kpos, const uint32_t* r2_pairs,
                     int64_t count, uint32_t* out) {
  for (int64_t i = 0; i < count; ++i) out[i] = up::BinaryBReg(words[i], kpos[i], r2_pairs[i]);
}

// out[b] = SignByteOr0(sign_packed, o, n, b, sign_bytes) for b < count.
void qx_sign_bytes_or0(const uint8_t* sign_packed, int64_t o, int64_t n, int64_t sign_bytes,
                       int64_t count, uint8_t* out) {
  for (int64_t b = 0; b < count; ++b) out[b] = up::SignByteOr0(sign_packed, o, n, b, sign_bytes);
}

// Salient weights rounded to fp16 bits [n, s] (the tensor-core path's B values).
void qx_salient_weights_half(const uint8_t* packed, const uint16_t* scale, const uint8_t* zero,
                             int64_t n, int64_t s, int64_t group_size, uint16_t* out) {
  const int64_t bytes = up::SalientBytes(s), groups = up::NumGroups(s, group_size);
  for (int64_t r = 0; r < n; ++r)
    for (int64_t j = 0; j < s; ++j)
      out[r * s + j] = up::SalientWeightHalfBits(packed + r * bytes, scale + r * groups,
                                                 zero + r * groups, j, s, group_size);
}

// Host emulation of GemmTcKernel (bml_cuda_gemm_tc.cu), step for step: the same tiles, staging
// maps, predicates, shared-memory layouts, fragment loads, B-register construction, row sums and
// epilogues, with the MMA emulated (EmuMma). fp16 x and y (bits), y [m, n]. One function of
// ~150 lines like the kernel it mirrors (its blocks and warps become loops), so that the two
// can be read side by side.
void qx_tc_emulate(int64_t m, int64_t k, int64_t n, int64_t s, int64_t group_size,
                   const uint16_t* x, const uint8_t* sign_packed, const uint16_t* row_scale,
                   const uint16_t* row_offset, const int32_t* salient_idx,
                   const uint8_t* salient_packed, const uint16_t* salient_scale,
                   const uint8_t* salient_zero, const uint16_t* r2, const float* bias,
                   uint16_t* y) {
  constexpr int BM = up::kTcBM, BN = up::kTcBN, BK = up::kTcBK, T = up::kTcThreads;
  constexpr int MI = up::kTcMI, NJ = up::kTcNJ, ST = up::kTcSmemStride;
  const int64_t kb = k - s;
  const int64_t sign_bytes = up::SignBytes(k, s), sal_bytes = up::SalientBytes(s);
  const int64_t groups = up::NumGroups(s, group_size);
  std::vector<int32_t> bc(static_cast<size_t>(kb));
  for (int64_t c = 0; c < kb; ++c)
    bc[c] = static_cast<int32_t>(up::BinaryChannel(c, salient_idx, s, k));

  static uint16_t as[BM][ST], ws[BN][ST], r2s[BK];
  static uint8_t sgn[BN][BK / 8];
  static float sumxb[BM], psum[T];
  static float acc[kWarps][MI][NJ][32][4];
  uint32_t af[32][MI][4], bf[32][2];

  for (int64_t m0 = 0; m0 < m; m0 += BM)
    for (int64_t n0 = 0; n0 < n; n0 += BN) {
      std::memset(acc, 0, sizeof acc);
      if (kb > 0) {
        std::memset(psum, 0, sizeof psum);
        for (int64_t c0 = 0; c0 < kb; c0 += BK) {
          for (int tid = 0; tid < T; ++tid) {
            const int scol = up::TcStageCol(tid);
            const int64_t c = c0 + scol;
            const bool cin = c < kb;
            const int64_t ch = cin ? bc[c] : 0;
            for (int it = 0; it < up::kTcStageIters; ++it) {
              const int rl = up::TcStageRow(tid, it);
              const int64_t row = m0 + rl;
              as[rl][scol] = (cin && row < m) ? x[row * k + ch] : uint16_t{0};
            }
            for (int i = tid; i < BN * (BK / 8); i += T) {
              const int nl = i / (BK / 8), b = i % (BK / 8);
              sgn[nl][b] = up::SignByteOr0(sign_packed, n0 + nl, n, c0 / 8 + b, sign_bytes);
            }
            if (tid < BK) r2s[tid] = up::R2HalfBits(r2, c0 + tid, kb);
          }
          // __syncthreads()
          for (int tid = 0; tid < T; ++tid) {
            const int sr = up::TcRowSumRow(tid), sc = up::TcRowSumCol(tid);
            for (int cc = 0; cc < up::kTcRowSumCols; ++cc)
              psum[tid] += up::HalfBitsToFloat(as[sr][sc + cc]) * up::HalfBitsToFloat(r2s[sc + cc]);
          }
          for (int w = 0; w < kWarps; ++w) {
            const int wrow = up::TcWarpRow(w), wcol = up::TcWarpCol(w);
            uint32_t words[32][NJ];
            for (int lane = 0; lane < 32; ++lane)
              for (int j = 0; j < NJ; ++j)
                std::memcpy(&words[lane][j], &sgn[wcol + 8 * j + up::MmaBElem(lane, 0).col][0], 4);
            for (int kk = 0; kk < BK / 16; ++kk) {
              for (int lane = 0; lane < 32; ++lane)
                for (int i = 0; i < MI; ++i)
                  for (int r = 0; r < 4; ++r) {
                    const up::RowCol rc = up::MmaAElem(lane, 2 * r);
                    af[lane][i][r] = Pair(&as[wrow + 16 * i + rc.row][16 * kk + rc.col]);
                  }
              for (int j = 0; j < NJ; ++j) {
                for (int lane = 0; lane < 32; ++lane) {
                  const int k_lo = 16 * kk + up::MmaBElem(lane, 0).row;
                  const int k_hi = 16 * kk + up::MmaBElem(lane, 2).row;
                  bf[lane][0] = up::BinaryBReg(words[lane][j], k_lo, Pair(&r2s[k_lo]));
                  bf[lane][1] = up::BinaryBReg(words[lane][j], k_hi, Pair(&r2s[k_hi]));
                }
                for (int i = 0; i < MI; ++i) {
                  uint32_t a1[32][4];
                  for (int lane = 0; lane < 32; ++lane) std::memcpy(a1[lane], af[lane][i], 16);
                  EmuMma(acc[w][i][j], a1, bf);
                }
              }
            }
          }
        }
        for (int tid = 0; tid < T; tid += 2)
          sumxb[up::TcRowSumRow(tid)] = psum[tid] + psum[tid ^ 1];
        for (int w = 0; w < kWarps; ++w)
          for (int i = 0; i < MI; ++i)
            for (int j = 0; j < NJ; ++j)
              for (int lane = 0; lane < 32; ++lane)
                for (int e = 0; e < 4; ++e) {
                  const up::RowCol rc = up::MmaCElem(lane, e);
                  const int64_t o = n0 + up::TcWarpCol(w) + 8 * j + rc.col;
                  if (o < n)
                    acc[w][i][j][lane][e] =
                        up::HalfBitsToFloat(row_scale[o]) * acc[w][i][j][lane][e] +
                        up::HalfBitsToFloat(row_offset[o]) * sumxb[up::TcWarpRow(w) + 16 * i + rc.row];
                }
      }
      for (int64_t j0 = 0; j0 < s; j0 += BK) {
        for (int tid = 0; tid < T; ++tid) {
          const int scol = up::TcStageCol(tid);
          const int64_t jc = j0 + scol;
          const bool jin = jc < s;
          const int64_t ch = jin ? up::ClampChannel(salient_idx[jc], k) : 0;
          for (int it = 0; it < up::kTcStageIters; ++it) {
            const int rl = up::TcStageRow(tid, it);
            const int64_t row = m0 + rl, o = n0 + rl;
            as[rl][scol] = (jin && row < m) ? x[row * k + ch] : uint16_t{0};
            ws[rl][scol] = (jin && o < n)
                               ? up::SalientWeightHalfBits(salient_packed + o * sal_bytes,
                                                           salient_scale + o * groups,
                                                           salient_zero + o * groups, jc, s,
                                                           group_size)
                               : uint16_t{0};
          }
        }
        for (int w = 0; w < kWarps; ++w) {
          const int wrow = up::TcWarpRow(w), wcol = up::TcWarpCol(w);
          for (int kk = 0; kk < BK / 16; ++kk) {
            for (int lane = 0; lane < 32; ++lane)
              for (int i = 0; i < MI; ++i)
                for (int r = 0; r < 4; ++r) {
                  const up::RowCol rc = up::MmaAElem(lane, 2 * r);
                  af[lane][i][r] = Pair(&as[wrow + 16 * i + rc.row][16 * kk + rc.col]);
                }
            for (int j = 0; j < NJ; ++j) {
              for (int lane = 0; lane < 32; ++lane) {
                const up::RowCol lo = up::MmaBElem(lane, 0), hi = up::MmaBElem(lane, 2);
                bf[lane][0] = Pair(&ws[wcol + 8 * j + lo.col][16 * kk + lo.row]);
                bf[lane][1] = Pair(&ws[wcol + 8 * j + hi.col][16 * kk + hi.row]);
              }
              for (int i = 0; i < MI; ++i) {
                uint32_t a1[32][4];
                for (int lane = 0; lane < 32; ++lane) std::memcpy(a1[lane], af[lane][i], 16);
                EmuMma(acc[w][i][j], a1, bf);
              }
            }
          }
        }
      }
      for (int w = 0; w < kWarps; ++w)
        for (int i = 0; i < MI; ++i)
          for (int j = 0; j < NJ; ++j)
            for (int lane = 0; lane < 32; ++lane)
              for (int e = 0; e < 4; ++e) {
                const up::RowCol rc = up::MmaCElem(lane, e);
                const int64_t row = m0 + up::TcWarpRow(w) + 16 * i + rc.row;
                const int64_t o = n0 + up::TcWarpCol(w) + 8 * j + rc.col;
                if (row >= m || o >= n) continue;
                float out = acc[w][i][j][lane][e];
                if (bias) out += bias[o];
                y[row * n + o] = up::FloatToHalfBits(out);
              }
    }
}

}  // extern "C"
