// qexport::BinaryMixedLinear CPU kernel, algorithm 2: dequantize + GEMM for large M (RunGemm;
// packed layout in bml_cpu_internal.h, design and measurements in docs/kernels.md).
//
// Per panel of output rows, W^T dequantized to fp32 in a per-thread buffer (the packed form
// stays the only copy of the weights), then a register-blocked FMA micro-kernel over the rows
// of X. It wins for large M where N is small (the tables' build per row of X is O(K) whatever
// N) or salient codes dominate (one lookup per code against one per 4 signs); a cost model per
// ISA path picks it (UseGemm, bml_cpu_dispatch.cpp).
#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "binary_mixed_linear/bml_cpu_internal.h"
#include "binary_mixed_linear/bml_cpu_scratch.h"
#include "qexport_parallel.h"

namespace qexport {
namespace bml {
namespace {

constexpr int64_t kGemmPassBytes = 4 << 20;  // fp32 copy of fp16 X rows per GEMM pass

// Dequantizes output rows [n0, n0 + nr) of W^T into panel[c * nr + o] (nr = gemm_nr;
// rows past the padded N read as zero).
void DequantPanel(const PackedWeights& p, const CpuKernels& kern, int64_t n0, float* panel) {
  const int64_t nr = kern.gemm_nr;
  for (int64_t o = 0; o < nr; o += kRowBlock) {
    const int64_t row = n0 + o;
    float* dst = panel + o;
    if (row >= p.npad) {
      for (int64_t c = 0; c < p.k; ++c) std::fill(dst + c * nr, dst + c * nr + kRowBlock, 0.0f);
      continue;
    }
    const int64_t line = GroupLine(row / kRowBlock, p.nblk);
    if (p.kb > 0)
      kern.dequant_signs(p.wb + BlockOffset(row / kRowBlock, p.kb_dw), line, p.kb, p.bin_chan.data(),
                         p.r2.empty() ? nullptr : p.r2.data(), p.pos.data() + row,
                         p.neg.data() + row, dst, nr);
    for (int64_t g = 0; g < p.groups; ++g) {
      const int64_t d0 = p.group_dw[g];
      kern.dequant_codes(p.ws + BlockOffset(row / kRowBlock, p.s_dw) + d0 * line, line,
                         p.group_dw[g + 1] - d0, p.slot_chan.data() + kNibbles * d0,
                         p.sscale.data() + g * p.npad + row, p.szero.data() + g * p.npad + row,
                         dst, nr);
    }
  }
}

}  // namespace

// Large M: per panel of gemm_nr output rows (one task each), W^T dequantized to fp32 in a
// per-thread buffer (K x gemm_nr floats), then the GEMM micro-kernel over all rows of X of
// the pass. fp32 X is read in place; fp16 X is converted in passes of rows.
template <typename T>
Status RunGemm(const Args& a, const PackedWeights& p, const CpuKernels& kern,
               const ParallelFor& par) {
  const int64_t m = a.m, k = a.k, n = a.n, nr = kern.gemm_nr;
  const int64_t npanels = (n + nr - 1) / nr;
  constexpr bool half = std::is_same<T, uint16_t>::value;
  const int64_t mp =
      half ? std::clamp<int64_t>(kGemmPassBytes / std::max<int64_t>(1, 4 * k), 1, m) : m;
  const T* x = static_cast<const T*>(a.x);
  T* y = static_cast<T*>(a.y);
  const float* bias = p.bias.empty() ? nullptr : p.bias.data();
  for (int64_t pm0 = 0; pm0 < m; pm0 += mp) {
    const int64_t pm = std::min(mp, m - pm0);
    const float* xa;
    if constexpr (half) {
      std::vector<float>& xf = ThreadCallScratch().xf;
      if (xf.size() < static_cast<size_t>(pm * k)) xf.resize(static_cast<size_t>(pm * k));
      Status st = ParallelRun(par, static_cast<size_t>(pm), [&](size_t i) {
        const T* src = x + (pm0 + static_cast<int64_t>(i)) * k;
        float* dst = xf.data() + static_cast<int64_t>(i) * k;
        for (int64_t c = 0; c < k; ++c) dst[c] = LoadF(src, c);
      });
      if (!st) return st;
      xa = xf.data();
    } else {
      xa = x + pm0 * k;
    }
    Status st = ParallelRun(par, static_cast<size_t>(npanels), [&](size_t item) {
      const int64_t n0 = static_cast<int64_t>(item) * nr;
      const int cols = static_cast<int>(std::min(nr, n - n0));
      TaskScratch& scratch = ThreadTaskScratch();
      std::vector<float>& panel = scratch.panel;
      if (panel.size() < static_cast<size_t>(k * nr)) panel.resize(static_cast<size_t>(k * nr));
      DequantPanel(p, kern, n0, panel.data());
      const float* b = bias ? bias + n0 : nullptr;
      if constexpr (!half) {
        kern.gemm(xa, k, pm, panel.data(), k, b, y + pm0 * n + n0, n, cols);
      } else {  // fp32 tiles of kStrip rows, then converted
        constexpr int64_t kStrip = 64;
        std::vector<float>& ctile = scratch.ctile;
        if (ctile.size() < static_cast<size_t>(kStrip * nr))
          ctile.resize(static_cast<size_t>(kStrip * nr));
        for (int64_t r0 = 0; r0 < pm; r0 += kStrip) {
          const int64_t rows = std::min(kStrip, pm - r0);
          kern.gemm(xa + r0 * k, k, rows, panel.data(), k, b, ctile.data(), nr, cols);
          for (int64_t r = 0; r < rows; ++r)
            for (int64_t o = 0; o < cols; ++o)
              StoreF(y, (pm0 + r0 + r) * n + n0 + o, ctile[r * nr + o]);
        }
      }
    });
    if (!st) return st;
  }
  return Status::Ok();
}

template Status RunGemm<float>(const Args&, const PackedWeights&, const CpuKernels&,
                               const ParallelFor&);
template Status RunGemm<uint16_t>(const Args&, const PackedWeights&, const CpuKernels&,
                                  const ParallelFor&);

}  // namespace bml
}  // namespace qexport
