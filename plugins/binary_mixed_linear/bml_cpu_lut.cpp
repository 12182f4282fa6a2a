// qexport::BinaryMixedLinear CPU kernel, algorithm 1: lookup tables over the packed weights
// (RunLut; packed layout in bml_cpu_internal.h, design and measurements in docs/kernels.md).
//
// Tables, per row of X (the activation side, built every call):
// - binary: x_b = X[binary channels] * r2 in groups of 4; a 16-entry table per group holds
//   the 16 sums +-x0 +-x1 +-x2 +-x3, and a sign nibble of a row is the index of its term, so
//   sum_c sign[n, c] x_b[c] is one table lookup and one add per 4 weights;
// - salient: a 16-entry table per salient column holds q * x[j] for q = 0..15, so a 4-bit
//   code is one lookup; per group, y += scale * sum_j q x[j] - scale * zero * sum_j x[j].
// The per-ISA loops (bml_cpu_kernels_*.cpp) do 16 lookups per instruction (vpermps), or on
// AVX-512 64 (vpermb over integer tables held as byte digits). Work is tiled over rows of X and
// output rows and spread over threads (RunLut's comments say how, for small and large M).
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

constexpr int64_t kChunkDw = 16;           // K chunk: 512 binary / 128 salient columns
constexpr int64_t kTileRows = 8;           // rows of X per tile (large M)
// Bytes of tables per pass over rows of X (small M: at most kTileRows * 2 - 1 rows, 1.6 MB
// at K = 4096); about an L2, so that a pass's tables are still cached when its tiles read
// them.
constexpr int64_t kTableBudget = 2 << 20;
// Small M: below this many weight reads (rows x padded N x K) a call runs on its calling
// thread, where waking ONNX Runtime's pool costs about what a second thread saves (a chain of
// 192x576 ops at 2 threads: 2.68 us against 2.76 at 1; 576x576: 3.67 against 4.17;
// 1536x576: 5.8 against 7.7). SmolLM2's token at 2 threads: 2.9 ms with this cutoff, 3.2-3.4
// with 1.5M (only the head and gate/up threaded).
constexpr int64_t kMinParallelWork = 200000;

// Sum of v[0, n), n a multiple of 8, in 8 interleaved partial sums (vectorizes; a single
// running sum would be a chain of dependent adds).
float Sum(const float* v, int64_t n) {
  float part[8] = {};
  for (int64_t i = 0; i < n; i += 8)
    for (int l = 0; l < 8; ++l) part[l] += v[i + l];
  return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
}

// Sizes of a row's tables, in floats: [lutb | luts | sum_b | xsum per group | table scale of
// lutb | table scale per group of luts] (the tables in the path's format, lut_dw_floats per
// dword).
struct TableLayout {
  int64_t dw, lutb, luts, tail, row;
  TableLayout(const PackedWeights& p, const CpuKernels& kern)
      : dw(kern.lut_dw_floats), lutb(dw * p.kb_dw), luts(dw * p.s_dw), tail(lutb + luts),
        row(tail + 2 + 2 * p.groups) {}
  // Offsets in the tail.
  int64_t sum_b() const { return tail; }
  int64_t xsum(int64_t g) const { return tail + 1 + g; }
  int64_t scale_b(const PackedWeights& p) const { return tail + 1 + p.groups; }
  int64_t scale_s(const PackedWeights& p, int64_t g) const { return tail + 2 + p.groups + g; }
};

// Builds the tables of one row of X at t (TableLayout).
template <typename T>
void BuildTables(const PackedWeights& p, const CpuKernels& kern, const TableLayout& tl,
                 const T* xr, float* t) {
  // x_b (zero padded to whole dwords) and the salient slots (0 in padding slots).
  const int64_t k = p.k, kdw = p.kb_dw, sdw = p.s_dw;
  std::vector<float>& buf = ThreadTaskScratch().buf;
  const int64_t nb_slots = 32 * kdw, ns_slots = kNibbles * sdw;
  const int64_t xf_size = std::is_same<T, float>::value ? 0 : k;
  const size_t need = static_cast<size_t>(nb_slots + ns_slots + p.s + xf_size + 2 * kSplitSlack);
  if (buf.size() < need) buf.resize(need);
  float* xb = buf.data();                       // nb_slots (+ slack)
  float* xs = xb + nb_slots + kSplitSlack;      // ns_slots
  float* xsal = xs + ns_slots;                  // s (+ slack): salient columns in order
  const float* xf;
  if constexpr (std::is_same<T, float>::value) {
    xf = xr;
  } else {  // fp16 X: the row as fp32 first
    float* conv = xsal + p.s + kSplitSlack;
    for (int64_t c = 0; c < k; ++c) conv[c] = LoadF(xr, c);
    xf = conv;
  }
  if (p.slots_dense) xsal = xs;
  kern.split_row(xf, k, p.bin_mask.data(), p.r2.empty() ? nullptr : p.r2.data(), xb, xsal);
  std::fill(xb + p.kb, xb + nb_slots, 0.0f);
  if (p.slots_dense) {
    std::fill(xs + p.s, xs + ns_slots, 0.0f);
  } else {
    std::fill(xs, xs + ns_slots, 0.0f);
    for (int64_t j = 0; j < p.s; ++j) xs[p.slot_of[j]] = xsal[j];
  }
  t[tl.scale_b(p)] = kern.sign_lut(xb, kdw, t);
  t[tl.sum_b()] = Sum(xb, nb_slots);
  for (int64_t g = 0; g < p.groups; ++g) {
    const int64_t d0 = p.group_dw[g], d1 = p.group_dw[g + 1];
    t[tl.scale_s(p, g)] = kern.code_lut(xs + kNibbles * d0, d1 - d0, t + tl.lutb + tl.dw * d0);
    t[tl.xsum(g)] = Sum(xs + kNibbles * d0, kNibbles * (d1 - d0));
  }
}

// One tile: rows [r0, r1) of X, whose tables are at `tables` (row r0 first), x blocks
// [nb0, nb1) of 16 output rows (whole groups, but for the last). `chunk`: dwords of K per
// lut_dot call.
template <typename T>
void RunTile(const PackedWeights& p, const CpuKernels& kern, const TableLayout& tl,
             const float* tables, int64_t r0, int64_t r1, int64_t nb0, int64_t nb1,
             int64_t chunk, T* y) {
  const int64_t npad = p.npad, kdw = p.kb_dw, sdw = p.s_dw;
  const int64_t width = (nb1 - nb0) * kRowBlock;
  // One accumulator per output: the binary dots scaled by row_scale, the salient ones by
  // their group's scale.
  std::vector<float>& acc = ThreadTaskScratch().acc;
  acc.assign(static_cast<size_t>((r1 - r0) * width), 0.0f);
  // One lut_dot: dwords [d0, d0 + len) of row r's tables at `table`, the group of blocks
  // from nb, of a [group][dw][blocks] array; `tscale`: the tail offset of the tables' scale.
  auto one = [&](int64_t r, int64_t nb, const uint8_t* w, int64_t dw, int64_t d0, int64_t len,
                 int64_t table, int64_t tscale, const float* scale) {
    const float* row_tables = tables + r * tl.row;
    const int cnt = static_cast<int>(std::min<int64_t>(kGroupBlocks, nb1 - nb));
    const int64_t line = GroupLine(nb, p.nblk);
    kern.lut_dot(w + (nb / kGroupBlocks) * dw * kGroupLine + d0 * line, line, cnt,
                 row_tables + table + tl.dw * d0, len,
                 acc.data() + r * width + (nb - nb0) * kRowBlock, scale + nb * kRowBlock,
                 row_tables[tscale]);
  };
  // The same over every row and every group of blocks of the tile.
  auto dot = [&](const uint8_t* w, int64_t dw, int64_t d0, int64_t len, int64_t table,
                 int64_t tscale, const float* scale) {
    for (int64_t r = 0; r < r1 - r0; ++r)
      for (int64_t nb = nb0; nb < nb1; nb += kGroupBlocks)
        one(r, nb, w, dw, d0, len, table, tscale, scale);
  };
  for (int64_t c0 = 0; c0 < kdw; c0 += chunk)
    dot(p.wb, kdw, c0, std::min(chunk, kdw - c0), 0, tl.scale_b(p), p.rs.data());
  // The 4-bit codes, per salient group (its own table scale and weight scales). With one row
  // of X a group of blocks takes every salient group in turn before the next: its groups'
  // dwords are adjacent, so the codes are read as one stream. Group by group, a tile range
  // is read in as many strided passes: the 4-bit head (49152 x 576, 9 groups of 64) read its
  // 14 MB that way. With more rows, group by group and chunk by chunk: a chunk's tables stay
  // in L1 across the rows. Each output adds its groups in the same order either way.
  if (r1 - r0 == 1) {
    for (int64_t nb = nb0; nb < nb1; nb += kGroupBlocks)
      for (int64_t g = 0; g < p.groups; ++g)
        for (int64_t c0 = p.group_dw[g]; c0 < p.group_dw[g + 1]; c0 += chunk)
          one(0, nb, p.ws, sdw, c0, std::min(chunk, p.group_dw[g + 1] - c0), tl.lutb,
              tl.scale_s(p, g), p.sscale.data() + g * npad);
  } else {
    for (int64_t g = 0; g < p.groups; ++g)
      for (int64_t c0 = p.group_dw[g]; c0 < p.group_dw[g + 1]; c0 += chunk)
        dot(p.ws, sdw, c0, std::min(chunk, p.group_dw[g + 1] - c0), tl.lutb, tl.scale_s(p, g),
            p.sscale.data() + g * npad);
  }
  // Epilogue: y = acc + row_offset * sum_b - sum_g scale * zero * xsum_g + bias.
  const int64_t n0 = nb0 * kRowBlock, n1 = std::min(p.n, nb1 * kRowBlock);
  for (int64_t r = 0; r < r1 - r0; ++r) {
    const float* row_tables = tables + r * tl.row;
    float* ab = acc.data() + r * width;
    const float sum_b = row_tables[tl.sum_b()];
    const float* ro = p.ro.data() + n0;
    for (int64_t j = 0; j < width; ++j) ab[j] += ro[j] * sum_b;
    if (p.has_zero) {
      for (int64_t g = 0; g < p.groups; ++g) {
        const float xs = row_tables[tl.xsum(g)];
        const float* sz = p.szero.data() + g * npad + n0;
        for (int64_t j = 0; j < width; ++j) ab[j] -= sz[j] * xs;
      }
    }
    if (!p.bias.empty())
      for (int64_t j = 0; j < width; ++j) ab[j] += p.bias[n0 + j];
    const int64_t row = r0 + r;
    for (int64_t o = n0; o < n1; ++o) StoreF(y, row * p.n + o, ab[o - n0]);
  }
}

}  // namespace

// Lookup tables per row of X.
template <typename T>
Status RunLut(const Args& a, const PackedWeights& p, const CpuKernels& kern,
              const ParallelFor& par) {
  const int64_t m = a.m, k = a.k;
  const TableLayout tl(p, kern);
  const T* x = static_cast<const T*>(a.x);
  T* y = static_cast<T*>(a.y);
  // Large M: one task per kTileRows rows of X. It builds their tables (~100 KB a row at
  // K = 4096: they stay in L2) and runs them over every output row, 1024 at a time, K in
  // chunks of kChunkDw so that a chunk's tables stay in L1 across those rows. One parallel
  // loop per call: with the tables built apart, in passes (two waits on the pool each), 2
  // threads on a loaded machine were up to 1.7x slower at M = 256.
  if (m >= kTileRows * 2) {
    const int64_t nrb = 1024 / kRowBlock;  // whole groups
    return ParallelRun(par, static_cast<size_t>((m + kTileRows - 1) / kTileRows), [&](size_t i) {
      const int64_t r0 = static_cast<int64_t>(i) * kTileRows, r1 = std::min(m, r0 + kTileRows);
      TaskScratch& scratch = ThreadTaskScratch();
      scratch.stamp = 0;  // the tables below are this task's rows only
      std::vector<float>& tables = scratch.tables;
      if (tables.size() < static_cast<size_t>(kTileRows * tl.row))
        tables.resize(static_cast<size_t>(kTileRows * tl.row));
      for (int64_t r = r0; r < r1; ++r)
        BuildTables(p, kern, tl, x + r * k, tables.data() + (r - r0) * tl.row);
      for (int64_t nb0 = 0; nb0 < p.nblk; nb0 += nrb)
        RunTile(p, kern, tl, tables.data(), r0, r1, nb0, std::min(p.nblk, nb0 + nrb), kChunkDw,
                y);
    });
  }
  // Small M (decoding): tiles over N, one group (128 output rows) each, so that the weights
  // stream once; K in one chunk (a table is read once per tile). The tiles are cut into one
  // contiguous range per CPU, and each task's thread builds the tables of all rows of the
  // pass itself (once per pass and thread, TaskScratch::stamp): tables built by one thread
  // and read by another crossed cores on every call (4096x4096 at 2 threads: 71 -> 54 us).
  const int64_t mp = std::max<int64_t>(
      1, std::min<int64_t>(m, kTableBudget / static_cast<int64_t>(4 * tl.row)));
  const int64_t n_tiles = p.ngrp;
  const int64_t ranges = std::min<int64_t>(n_tiles, Cpus());
  const int64_t chunk = std::max<int64_t>(p.kb_dw, p.s_dw);
  for (int64_t pm0 = 0; pm0 < m; pm0 += mp) {
    const int64_t pm = std::min(mp, m - pm0);
    const uint64_t stamp = NewStamp();
    // Small jobs run on the calling thread alone: waking the pool costs more than it saves.
    const bool alone = pm * p.npad * p.k < kMinParallelWork;
    Status st = ParallelRun(alone ? ParallelFor{} : par, static_cast<size_t>(alone ? 1 : ranges),
                            [&](size_t i) {
      TaskScratch& scratch = ThreadTaskScratch();
      std::vector<float>& tables = scratch.tables;
      if (scratch.stamp != stamp) {
        // Every float of a row's tables is written before it is read: no clearing needed.
        if (tables.size() < static_cast<size_t>(pm * tl.row))
          tables.resize(static_cast<size_t>(pm * tl.row));
        for (int64_t r = 0; r < pm; ++r)
          BuildTables(p, kern, tl, x + (pm0 + r) * k, tables.data() + r * tl.row);
        scratch.stamp = stamp;
      }
      const int64_t parts = alone ? 1 : ranges, idx = static_cast<int64_t>(i);
      const int64_t t0 = n_tiles * idx / parts, t1 = n_tiles * (idx + 1) / parts;
      // One row of X: the whole range in one RunTile, i.e. the binary codes of all its tiles,
      // then the 4-bit ones: each array is read as one contiguous stream instead of
      // alternating every 52 KB (4096x4096: 0.129-0.151 ms against 0.147-0.156 at 1 thread,
      // 0.071-0.088 against 0.091-0.104 at 2; same-run medians). With more rows the tile
      // order stays: there each tile's codes are reused from L2 by every row.
      const int64_t step = pm == 1 ? std::max<int64_t>(1, t1 - t0) : 1;
      for (int64_t t = t0; t < t1; t += step) {
        const int64_t nb0 = t * kGroupBlocks;
        RunTile(p, kern, tl, tables.data(), pm0, pm0 + pm, nb0,
                std::min(p.nblk, std::min(t1, t + step) * kGroupBlocks), chunk, y);
      }
    });
    if (!st) return st;
  }
  return Status::Ok();
}

template Status RunLut<float>(const Args&, const PackedWeights&, const CpuKernels&,
                              const ParallelFor&);
template Status RunLut<uint16_t>(const Args&, const PackedWeights&, const CpuKernels&,
                                 const ParallelFor&);

}  // namespace bml
}  // namespace qexport
