// qexport::BinaryMixedLinear CPU kernel: lookup tables over the packed weights, or for
// large M dequantized panels + GEMM; fp32 accumulation, or exact integer sums over the
// AVX-512 path's integer tables (docs/kernels.md has the design and the measurements).
//
// Weights, packed once from layout 1 (PackWeights; the ORT glue caches them for constant
// initializers):
// - output rows in blocks of 16 (N padded with zero rows to a whole block), blocks in groups
//   of 8, the last group holding what is left;
// - binary part: per group, per dword q of the sign rows (binary columns 32q..32q+31), the
//   group's blocks' 64-byte lines of 16 rows x the layout-1 bytes 4q..4q+3
//   (bml_cpu_kernels.h): one 64-byte load gives 16 rows x 32 signs, and a group is read as
//   one stream;
// - salient part: the same order over the 4-bit codes, each group's columns padded to a
//   multiple of 8 so that no dword straddles two groups;
// - fp16 parameters as fp32, per-group scales as [group][N] rows.
// Tables (RunLut), per row of X (the activation side, built every call):
// - binary: x_b = X[binary channels] * r2 in groups of 4; a 16-entry table per group holds
//   the 16 sums +-x0 +-x1 +-x2 +-x3, and a sign nibble of a row is the index of its term, so
//   sum_c sign[n, c] x_b[c] is one table lookup and one add per 4 weights;
// - salient: a 16-entry table per salient column holds q * x[j] for q = 0..15, so a 4-bit
//   code is one lookup; per group, y += scale * sum_j q x[j] - scale * zero * sum_j x[j].
// The per-ISA loops (bml_cpu_kernels_*.cpp) do 16 lookups per instruction (vpermps), or on
// AVX-512 64 (vpermb over integer tables held as byte digits).
// Dequantize + GEMM (RunGemm): per panel of output rows, W^T dequantized to fp32 in a
// per-thread buffer (the packed form stays the only copy of the weights), then a
// register-blocked FMA micro-kernel over the rows of X. It wins for large M where N is
// small (the tables' build per row of X is O(K) whatever N) or salient codes dominate (one
// lookup per code against one per 4 signs); a cost model per ISA path picks (UseGemm).
// Inputs or parameters that are not finite go to the plain kernel (RunCpuPlain), where no
// reordering can turn an infinity into NaN.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <new>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

#include "binary_mixed_linear/bml_cpu.h"
#include "binary_mixed_linear/bml_cpu_kernels.h"

namespace qexport {
namespace bml {

#if defined(__linux__)
// Packed weights under kLargest share 2 MiB-aligned MADV_HUGEPAGE chunks instead of mappings of
// their own: a model's many small layers (SmolLM2: 211 of 10-200 KB) then cost a handful of
// TLB entries, not one per 4 KiB (its decoded token 3-11 % faster, docs/kernels.md), and a
// layer's last partial 2 MiB is a huge page too (4096x4096: 3.4 MB, of which 1.4 MB were in
// 4 KiB pages). Bump allocation in the newest chunk; what a chunk has left when the next
// allocation does not fit is never touched, so it costs address space only. A chunk is
// unmapped when its last allocation is freed (the newest one is reused from the start
// instead). Never destroyed: kernels may outlive static destructors at exit.
class SmallArena {
 public:
  static constexpr size_t kHuge = size_t{2} << 20;
  static constexpr size_t kChunk = 16 * kHuge;
  static constexpr size_t kLargest = kChunk / 2;  // larger: a mapping of its own
  static constexpr size_t kAlign = 64;

  static SmallArena& Get() {
    static SmallArena* arena = new SmallArena;
    return *arena;
  }

  // Zero-filled bytes (< kLargest) and the chunk to hand back to Free.
  uint8_t* Allocate(size_t bytes, void** chunk) {
    bytes = (std::max<size_t>(bytes, 1) + kAlign - 1) / kAlign * kAlign;
    std::lock_guard<std::mutex> lock(mutex_);
    if (current_ == nullptr || current_->used + bytes > kChunk) current_ = NewChunk();
    uint8_t* p = current_->base + current_->used;
    current_->used += bytes;
    ++current_->live;
    std::memset(p, 0, bytes);  // a chunk's start is reused once its allocations are gone
    *chunk = current_;
    return p;
  }

  void Free(void* chunk) {
    std::lock_guard<std::mutex> lock(mutex_);
    Chunk* c = static_cast<Chunk*>(chunk);
    if (--c->live > 0) return;
    if (c == current_) {
      c->used = 0;
      return;
    }
    munmap(c->base, kChunk);
    delete c;
  }

 private:
  struct Chunk {
    uint8_t* base;
    size_t used = 0;
    int live = 0;
  };

  static Chunk* NewChunk() {
    const size_t span = kChunk + kHuge;
    void* m = mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) throw std::bad_alloc();
    const uintptr_t begin = reinterpret_cast<uintptr_t>(m);
    const uintptr_t start = (begin + kHuge - 1) / kHuge * kHuge;
    if (start > begin) munmap(m, start - begin);
    const uintptr_t end = start + kChunk;
    if (begin + span > end) munmap(reinterpret_cast<void*>(end), begin + span - end);
#if defined(MADV_HUGEPAGE)
    (void)madvise(reinterpret_cast<void*>(start), kChunk, MADV_HUGEPAGE);  // a hint only
#endif
    return new Chunk{reinterpret_cast<uint8_t*>(start)};
  }

  std::mutex mutex_;
  Chunk* current_ = nullptr;  // the newest chunk; older ones live until their last Free
};
#endif

// Zero-filled bytes for the packed weights. On Linux: below 16 MiB a piece of a shared
// huge-page chunk (SmallArena); from there on an anonymous mapping of its own, 2 MiB aligned
// and marked MADV_HUGEPAGE, so that transparent huge pages back its whole 2 MiB extents (the
// tail stays in 4 KiB pages: no memory is added). The M = 1 path streams the weights once
// per call, and with 4 KiB pages the TLB misses cost more than the lookups (measured in a
// KVM guest, 4096x4096: 0.31 -> 0.17 ms with the weights in DRAM, 0.13 -> 0.10 ms in L3).
// Elsewhere: plain heap memory.
class WeightBytes {
 public:
  WeightBytes() = default;
  WeightBytes(const WeightBytes&) = delete;
  WeightBytes& operator=(const WeightBytes&) = delete;
  ~WeightBytes() { Free(); }

  uint8_t* Allocate(size_t bytes) {
    Free();
#if defined(__linux__)
    static const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    constexpr size_t kHuge = SmallArena::kHuge;
    if (bytes < SmallArena::kLargest) return data_ = SmallArena::Get().Allocate(bytes, &chunk_);
    size_ = (std::max<size_t>(bytes, 1) + page - 1) / page * page;
    const size_t align = kHuge;
    const size_t span = size_ + align - page;
    void* m = mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) throw std::bad_alloc();
    const uintptr_t begin = reinterpret_cast<uintptr_t>(m);
    const uintptr_t start = (begin + align - 1) / align * align;
    if (start > begin) munmap(m, start - begin);  // trim to the aligned span
    const uintptr_t end = start + size_, span_end = begin + span;
    if (span_end > end) munmap(reinterpret_cast<void*>(end), span_end - end);
    data_ = reinterpret_cast<uint8_t*>(start);
#if defined(MADV_HUGEPAGE)
    (void)madvise(data_, size_, MADV_HUGEPAGE);  // a hint only
#endif
#else
    heap_.assign(std::max<size_t>(bytes, 1), 0);
    data_ = heap_.data();
#endif
    return data_;
  }

 private:
  void Free() {
#if defined(__linux__)
    if (chunk_) {
      SmallArena::Get().Free(chunk_);
    } else if (data_) {
      munmap(data_, size_);
    }
    chunk_ = nullptr;
#endif
    data_ = nullptr;
  }
  uint8_t* data_ = nullptr;
#if defined(__linux__)
  size_t size_ = 0;
  void* chunk_ = nullptr;  // SmallArena's chunk when the bytes are a piece of one
#else
  std::vector<uint8_t> heap_;
#endif
};

struct PackedWeights {
  int64_t k = 0, n = 0, s = 0, kb = 0, group_size = 0, groups = 0;
  int64_t nblk = 0, npad = 0, ngrp = 0;  // blocks of 16 rows, npad = 16 nblk, groups of 8
  int64_t kb_dw = 0;                  // ceil(kb / 32): dwords per sign row
  WeightBytes bytes;                  // wb and ws
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
};

namespace {

using detail::CpuKernels;
using detail::kBlockLine;
using detail::kGroupBlocks;
using detail::kGroupLine;
using detail::kNibbles;
using detail::kRowBlock;
using detail::kSplitSlack;

// Bytes per dword of the group of block `blk` of `nblk` (all groups but the last are full).
int64_t GroupLine(int64_t blk, int64_t nblk) {
  const int64_t first = blk / kGroupBlocks * kGroupBlocks;
  return std::min<int64_t>(kGroupBlocks, nblk - first) * kBlockLine;
}

// Offset of row `row`'s line (dword 0) in a [group][dword][block][row][4 bytes] array with
// `dw` dwords per row (the groups before it are full); dword q of the row is q * GroupLine
// further.
int64_t LineOffset(int64_t row, int64_t dw) {
  const int64_t blk = row / kRowBlock;
  return (blk / kGroupBlocks) * dw * kGroupLine + (blk % kGroupBlocks) * kBlockLine +
         4 * (row % kRowBlock);
}

bool FiniteHalf(uint16_t h) { return (h & 0x7c00u) != 0x7c00u; }

bool CpuHas(Isa isa) {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  switch (isa) {
    case Isa::kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case Isa::kAvx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vbmi") &&
             __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("fma");
    default:
      return true;
  }
#else
  return isa == Isa::kAuto || isa == Isa::kPortable;
#endif
}

const CpuKernels* Kernels(Isa isa) {
  switch (isa) {
    case Isa::kAvx2: return detail::KernelsAvx2();
    case Isa::kAvx512: return detail::KernelsAvx512();
    default: return &detail::KernelsPortable();
  }
}

Status CheckSizes(const Args& a) {
  if (a.m < 0 || a.k < 0 || a.n < 0 || a.s < 0 || a.s > a.k || a.group_size < 0)
    return Status::Error("bad sizes M=" + std::to_string(a.m) + " K=" + std::to_string(a.k) +
                         " N=" + std::to_string(a.n) + " S=" + std::to_string(a.s) +
                         " G=" + std::to_string(a.group_size));
  return Status::Ok();
}

// Hands the pages of [data, data + bytes) back to the OS (rounded out to whole pages): see
// PackWeights' release_source. MADV_PAGEOUT (Linux 5.4+) reclaims clean file pages at once and
// never loses data; where it is missing or fails this does nothing.
void ReleasePages(const void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_PAGEOUT)
  static const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  if (!data || bytes == 0 || page == 0 || (page & (page - 1)) != 0) return;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(data) & ~(page - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes + page - 1) & ~(page - 1);
  (void)madvise(reinterpret_cast<void*>(begin), end - begin, MADV_PAGEOUT);
#else
  (void)data;
  (void)bytes;
#endif
}

// Releases (ReleasePages) the rows of a row-major source as packing moves past them, in
// chunks of ~1 MiB, so that the source and the packed copy never both sit in memory whole.
class RowReleaser {
 public:
  RowReleaser(bool on, const void* base, int64_t row_bytes, int64_t rows)
      : on_(on && base && row_bytes > 0), base_(static_cast<const uint8_t*>(base)),
        row_bytes_(row_bytes), rows_(rows),
        chunk_(std::max<int64_t>(1, (int64_t{1} << 20) / std::max<int64_t>(1, row_bytes))) {}
  void Done(int64_t row) {  // rows < row + 1 are done
    if (on_ && (row + 1 - done_ >= chunk_ || row + 1 == rows_)) {
      ReleasePages(base_ + done_ * row_bytes_, static_cast<size_t>((row + 1 - done_) * row_bytes_));
      done_ = row + 1;
    }
  }

 private:
  bool on_;
  const uint8_t* base_;
  int64_t row_bytes_, rows_, chunk_, done_ = 0;
};

Status Pack(const Args& a, PackedWeights* p, bool release) {
  Status st = CheckSizes(a);
  if (!st) return st;
  const bool have_binary = a.k > a.s, have_salient = a.s > 0;
  if (!a.row_scale || !a.row_offset || (have_binary && !a.sign_packed) ||
      (have_salient && (!a.salient_idx || !a.salient_packed || !a.salient_scale ||
                        !a.salient_zero)))
    return Status::Error("a required weight pointer is null");
  p->k = a.k;
  p->n = a.n;
  p->s = a.s;
  p->kb = a.k - a.s;
  p->group_size = a.group_size;
  p->groups = NumGroups(a.s, a.group_size);
  const int64_t gsz = a.group_size > 0 ? a.group_size : a.s;
  p->nblk = (a.n + kRowBlock - 1) / kRowBlock;
  p->npad = p->nblk * kRowBlock;
  p->ngrp = (p->nblk + kGroupBlocks - 1) / kGroupBlocks;
  const int64_t n = a.n, npad = p->npad;

  std::vector<uint8_t> is_salient(static_cast<size_t>(a.k), 0);
  for (int64_t j = 0; j < a.s; ++j) {
    const int64_t c = a.salient_idx[j];
    if (c < 0 || c >= a.k || (j > 0 && c <= a.salient_idx[j - 1]))
      return Status::Error("salient_idx[" + std::to_string(j) + "] = " + std::to_string(c) +
                           " is not strictly increasing within [0, " + std::to_string(a.k) +
                           ")");
    is_salient[c] = 1;
  }
  p->bin_chan.reserve(static_cast<size_t>(p->kb));
  p->bin_mask.assign(static_cast<size_t>((a.k + 15) / 16), 0);
  for (int64_t c = 0; c < a.k; ++c) {
    if (is_salient[c]) continue;
    p->bin_chan.push_back(static_cast<int32_t>(c));
    p->bin_mask[c / 16] |= static_cast<uint16_t>(1u << (c % 16));
  }

  auto half_row = [&](const uint16_t* src, int64_t count, std::vector<float>* dst) {
    dst->assign(static_cast<size_t>(npad), 0.0f);
    for (int64_t i = 0; i < count; ++i) {
      p->finite = p->finite && FiniteHalf(src[i]);
      (*dst)[i] = HalfToFloat(src[i]);
    }
  };
  half_row(a.row_scale, n, &p->rs);
  half_row(a.row_offset, n, &p->ro);
  p->pos.resize(static_cast<size_t>(npad));
  p->neg.resize(static_cast<size_t>(npad));
  for (int64_t i = 0; i < npad; ++i) {
    p->pos[i] = p->ro[i] + p->rs[i];
    p->neg[i] = p->ro[i] - p->rs[i];
  }
  if (a.r2) {
    p->r2.resize(static_cast<size_t>(p->kb));
    for (int64_t c = 0; c < p->kb; ++c) {
      p->finite = p->finite && FiniteHalf(a.r2[c]);
      p->r2[c] = HalfToFloat(a.r2[c]);
    }
  }
  if (a.bias) {
    p->bias.assign(static_cast<size_t>(npad), 0.0f);
    std::copy(a.bias, a.bias + n, p->bias.begin());
  }

  // Sizes: sign rows in dwords; salient groups padded to a multiple of 8 codes (whole
  // dwords, so that no dword straddles two groups). Both parts in one block.
  const int64_t kbb = (p->kb + 7) / 8;
  p->kb_dw = (p->kb + 31) / 32;
  const int64_t groups = p->groups;
  p->group_dw.assign(static_cast<size_t>(groups + 1), 0);
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t cnt = std::min(a.s, (g + 1) * gsz) - g * gsz;
    p->group_dw[g + 1] = p->group_dw[g] + (cnt + kNibbles - 1) / kNibbles;
  }
  p->s_dw = p->group_dw[groups];
  const int64_t wb_bytes = p->nblk * p->kb_dw * kBlockLine;
  p->wb = p->bytes.Allocate(static_cast<size_t>(wb_bytes + p->nblk * p->s_dw * kBlockLine));
  p->ws = p->wb + wb_bytes;

  // Binary signs: the bytes of layout 1 unchanged, 4 per dword (LineOffset).
  RowReleaser sign_release(release, a.sign_packed, kbb, n);
  for (int64_t row = 0; row < n; ++row) {
    const uint8_t* src = a.sign_packed + row * kbb;
    uint8_t* dst = p->wb + LineOffset(row, p->kb_dw);
    const int64_t line = GroupLine(row / kRowBlock, p->nblk);
    for (int64_t b = 0; b < kbb; ++b) dst[(b / 4) * line + b % 4] = src[b];
    sign_release.Done(row);
  }

  // Salient codes: the nibbles of layout 1, moved to their padded slots.
  p->slot_chan.assign(static_cast<size_t>(kNibbles * p->s_dw), -1);
  p->slot_of.resize(static_cast<size_t>(a.s));
  for (int64_t j = 0; j < a.s; ++j) {
    const int64_t g = j / gsz;
    p->slot_of[j] = static_cast<int32_t>(kNibbles * p->group_dw[g] + (j - g * gsz));
    p->slot_chan[p->slot_of[j]] = a.salient_idx[j];
    p->slots_dense = p->slots_dense && p->slot_of[j] == j;
  }
  const int64_t sal_bytes = (a.s + 1) / 2;
  RowReleaser code_release(release, a.salient_packed, sal_bytes, n);
  for (int64_t row = 0; row < n; ++row) {
    const uint8_t* src = a.salient_packed + row * sal_bytes;
    uint8_t* dst = p->ws + LineOffset(row, p->s_dw);
    const int64_t line = GroupLine(row / kRowBlock, p->nblk);
    for (int64_t j = 0; j < a.s; ++j) {
      const int q = (src[j >> 1] >> ((j & 1) * 4)) & 0xf;
      const int64_t slot = p->slot_of[j], nib = slot % kNibbles;
      dst[(slot / kNibbles) * line + nib / 2] |= static_cast<uint8_t>(q << ((nib & 1) * 4));
    }
    code_release.Done(row);
  }
  p->sscale.assign(static_cast<size_t>(groups * npad), 0.0f);
  p->szero.assign(static_cast<size_t>(groups * npad), 0.0f);
  for (int64_t row = 0; row < n; ++row) {
    for (int64_t g = 0; g < groups; ++g) {
      const uint16_t h = a.salient_scale[row * groups + g];
      p->finite = p->finite && FiniteHalf(h);
      const float scale = HalfToFloat(h);
      const int zero = a.salient_zero[row * groups + g];
      p->sscale[g * npad + row] = scale;
      p->szero[g * npad + row] = scale * static_cast<float>(zero);
      p->has_zero = p->has_zero || zero != 0;
    }
  }
  if (release) {  // the small inputs, all copied above
    ReleasePages(a.row_scale, static_cast<size_t>(n) * 2);
    ReleasePages(a.row_offset, static_cast<size_t>(n) * 2);
    ReleasePages(a.salient_idx, static_cast<size_t>(a.s) * 4);
    ReleasePages(a.salient_scale, static_cast<size_t>(n * groups) * 2);
    ReleasePages(a.salient_zero, static_cast<size_t>(n * groups));
    if (a.r2) ReleasePages(a.r2, static_cast<size_t>(p->kb) * 2);
    if (a.bias) ReleasePages(a.bias, static_cast<size_t>(n) * 4);
  }
  return Status::Ok();
}

// Calls fn(i) for i < total through `par` (serially when it has no pool); exceptions
// inside a task are caught and reported as the returned status.
template <typename Fn>
Status ParallelRun(const ParallelFor& par, size_t total, Fn fn) {
  struct Ctx {
    Fn* fn;
    std::atomic<bool> failed{false};
    std::string message;
    std::atomic_flag message_lock = ATOMIC_FLAG_INIT;
  } ctx;
  ctx.fn = &fn;
  auto task = [](void* data, size_t i) {
    Ctx* c = static_cast<Ctx*>(data);
    if (c->failed.load(std::memory_order_relaxed)) return;
    std::string err;
    try {
      (*c->fn)(i);
      return;
    } catch (...) {
      err = ExceptionMessage();
    }
    if (!c->message_lock.test_and_set()) c->message = err;
    c->failed.store(true);
  };
  if (total == 0) return Status::Ok();
  if (total == 1 || !par.run) {
    for (size_t i = 0; i < total; ++i) task(&ctx, i);
  } else {
    par.run(par.pool, task, total, &ctx);
  }
  if (ctx.failed.load()) return Status::Error(ctx.message);
  return Status::Ok();
}

inline float LoadF(const float* p, int64_t i) { return p[i]; }
inline float LoadF(const uint16_t* p, int64_t i) { return HalfToFloat(p[i]); }
inline void StoreF(float* p, int64_t i, float v) { p[i] = v; }
inline void StoreF(uint16_t* p, int64_t i, float v) { p[i] = FloatToHalf(v); }

constexpr int64_t kChunkDw = 16;           // K chunk: 512 binary / 128 salient columns
constexpr int64_t kTileRows = 8;           // rows of X per tile (large M)
// Bytes of tables per pass over rows of X (small M: at most kTileRows * 2 - 1 rows, 1.6 MB
// at K = 4096); about an L2, so that a pass's tables are still cached when its tiles read
// them.
constexpr int64_t kTableBudget = 2 << 20;
constexpr int64_t kGemmPassBytes = 4 << 20;  // fp32 copy of fp16 X rows per GEMM pass
// Small M: below this many weight reads (rows x padded N x K) a call runs on its calling
// thread, where waking ONNX Runtime's pool costs about what a second thread saves (a chain of
// 192x576 ops at 2 threads: 2.68 us against 2.76 at 1; 576x576: 3.67 against 4.17;
// 1536x576: 5.8 against 7.7). SmolLM2's token at 2 threads: 2.9 ms with this cutoff, 3.2-3.4
// with 1.5M (only the head and gate/up threaded).
constexpr int64_t kMinParallelWork = 200000;

// Scratch buffers kept per thread across calls (a small model makes hundreds of short calls
// per forward; allocating these on each one showed up in profiles). CallScratch belongs to
// the thread that runs Run; TaskScratch to the thread running a task (the calling thread
// may run tasks too, hence two separate objects). Grow-only.
struct CallScratch {
  std::vector<float> xf;      // RunGemm: fp16 X rows of a pass as fp32
};
struct TaskScratch {
  std::vector<float> buf, acc, tables;   // RunLut: tables of a pass (small M) or a task's rows
  uint64_t stamp = 0;                    // the small-M pass whose tables `tables` holds; 0: none
  std::vector<float> panel, ctile;       // RunGemm: dequantized panel, fp32 rows for fp16 Y
};
// A number no earlier pass got (never 0).
uint64_t NewStamp() {
  static std::atomic<uint64_t> next{1};
  return next.fetch_add(1, std::memory_order_relaxed);
}
// CPUs that tasks can spread over (at least 1).
int64_t Cpus() {
  static const int64_t n = std::max<unsigned>(1, std::thread::hardware_concurrency());
  return n;
}
CallScratch& ThreadCallScratch() {
  thread_local CallScratch s;
  return s;
}
TaskScratch& ThreadTaskScratch() {
  thread_local TaskScratch s;
  return s;
}

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
  // lut_dot over dwords [d0, d0 + len) of the rows' tables at `table`, every group of the
  // tile, of a [group][dw][blocks] array; `tscale`: the tail offset of the tables' scale.
  auto dot = [&](const uint8_t* w, int64_t dw, int64_t d0, int64_t len, int64_t table,
                 int64_t tscale, const float* scale) {
    for (int64_t r = 0; r < r1 - r0; ++r) {
      const float* row_tables = tables + r * tl.row;
      const float* lut = row_tables + table + tl.dw * d0;
      float* out = acc.data() + r * width;
      for (int64_t nb = nb0; nb < nb1; nb += kGroupBlocks) {
        const int cnt = static_cast<int>(std::min<int64_t>(kGroupBlocks, nb1 - nb));
        const int64_t line = GroupLine(nb, p.nblk);
        kern.lut_dot(w + (nb / kGroupBlocks) * dw * kGroupLine + d0 * line, line, cnt, lut, len,
                     out + (nb - nb0) * kRowBlock, scale + nb * kRowBlock, row_tables[tscale]);
      }
    }
  };
  for (int64_t c0 = 0; c0 < kdw; c0 += chunk)
    dot(p.wb, kdw, c0, std::min(chunk, kdw - c0), 0, tl.scale_b(p), p.rs.data());
  for (int64_t g = 0; g < p.groups; ++g)
    for (int64_t c0 = p.group_dw[g]; c0 < p.group_dw[g + 1]; c0 += chunk)
      dot(p.ws, sdw, c0, std::min(chunk, p.group_dw[g + 1] - c0), tl.lutb, tl.scale_s(p, g),
          p.sscale.data() + g * npad);
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
      kern.dequant_signs(p.wb + LineOffset(row, p.kb_dw), line, p.kb, p.bin_chan.data(),
                         p.r2.empty() ? nullptr : p.r2.data(), p.pos.data() + row,
                         p.neg.data() + row, dst, nr);
    for (int64_t g = 0; g < p.groups; ++g) {
      const int64_t d0 = p.group_dw[g];
      kern.dequant_codes(p.ws + LineOffset(row, p.s_dw) + d0 * line, line,
                         p.group_dw[g + 1] - d0, p.slot_chan.data() + kNibbles * d0,
                         p.sscale.data() + g * p.npad + row, p.szero.data() + g * p.npad + row,
                         dst, nr);
    }
  }
}

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

// Whether the dequantize + GEMM path serves this call: by the path's cost model
// (detail::GemmCosts) unless QEXPORT_CPU_ALGO forces a choice.
bool UseGemm(const CpuKernels& kern, Algo algo, const PackedWeights& p, int64_t m) {
  if (!kern.gemm || algo == Algo::kTables) return false;
  if (algo == Algo::kGemm) return true;
  const detail::GemmCosts& c = kern.gemm_costs;
  if (m < c.min_rows) return false;
  const double rows = static_cast<double>(m), blocks = static_cast<double>(p.nblk);
  const double k = static_cast<double>(p.k), kb = static_cast<double>(p.kb);
  const double s = static_cast<double>(p.s);
  const double fields = static_cast<double>(kNibbles * (p.kb_dw + p.s_dw));
  const double gemm = (rows + c.dequant) * blocks * k;
  const double tables = rows * (c.build_binary * kb + c.build_salient * s +
                                blocks * (c.lookup * fields + c.epilogue));
  return gemm < tables;
}

template <typename T>
Status Run(const Args& a, const PackedWeights& p, const CpuKernels& kern, Algo algo,
           const ParallelFor& par) {
  return UseGemm(kern, algo, p, a.m) ? RunGemm<T>(a, p, kern, par)
                                     : RunLut<T>(a, p, kern, par);
}

}  // namespace

const char* IsaName(Isa isa) {
  switch (isa) {
    case Isa::kAuto: return "auto";
    case Isa::kPortable: return "portable";
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512: return "avx512";
  }
  return "?";
}

bool IsaSupported(Isa isa) { return Kernels(isa) != nullptr && CpuHas(isa); }

Isa BestIsa() {
  if (IsaSupported(Isa::kAvx512)) return Isa::kAvx512;
  if (IsaSupported(Isa::kAvx2)) return Isa::kAvx2;
  return Isa::kPortable;
}

Status ResolveIsa(const char* name, Isa* out) {
  const std::string v = name ? name : "";
  Isa isa;
  if (v.empty() || v == "auto") {
    *out = BestIsa();
    return Status::Ok();
  } else if (v == "portable") {
    isa = Isa::kPortable;
  } else if (v == "avx2") {
    isa = Isa::kAvx2;
  } else if (v == "avx512") {
    isa = Isa::kAvx512;
  } else {
    return Status::Error(std::string(kIsaEnv) + "='" + v +
                         "' is not one of auto, portable, avx2, avx512");
  }
  if (!IsaSupported(isa)) {
    std::string have = "portable";
    if (IsaSupported(Isa::kAvx2)) have += ", avx2";
    if (IsaSupported(Isa::kAvx512)) have += ", avx512";
    return Status::Error(std::string(kIsaEnv) + "=" + v + ": this CPU (or build) lacks " +
                         (isa == Isa::kAvx2 ? "AVX2/FMA" : "AVX-512 F/BW/VL") +
                         "; available: " + have);
  }
  *out = isa;
  return Status::Ok();
}

Status IsaFromEnvironment(Isa* out) { return ResolveIsa(std::getenv(kIsaEnv), out); }

Status CpuPathFromEnvironment(CpuPath* out) {
  Status st = IsaFromEnvironment(&out->isa);
  if (!st) return st;
  const char* env = std::getenv(kAlgoEnv);
  const std::string v = env ? env : "";
  if (v.empty() || v == "auto") {
    out->algo = Algo::kAuto;
  } else if (v == "tables") {
    out->algo = Algo::kTables;
  } else if (v == "gemm") {
    out->algo = Algo::kGemm;
  } else {
    return Status::Error(std::string(kAlgoEnv) + "='" + v + "' is not one of auto, tables, gemm");
  }
  return Status::Ok();
}

Status PackWeights(const Args& a, PackedPtr* out, bool release_source) noexcept {
  try {
    auto p = std::make_shared<PackedWeights>();
    Status st = Pack(a, p.get(), release_source);
    if (!st) return st;
    *out = std::move(p);
    return Status::Ok();
  } catch (...) {
    return Status::Error(ExceptionMessage());
  }
}

Status RunCpuPacked(const Args& a, const PackedWeights& p, const CpuPath& path,
                    const ParallelFor& par) noexcept {
  try {
    Status st = CheckSizes(a);
    if (!st) return st;
    if (a.k != p.k || a.n != p.n || a.s != p.s || a.group_size != p.group_size)
      return Status::Error("packed weights were built for other sizes");
    if (a.m == 0 || a.n == 0) return Status::Ok();
    if (!a.x || !a.y) return Status::Error("a required input pointer is null");
    const Isa isa = path.isa == Isa::kAuto ? BestIsa() : path.isa;
    if (!IsaSupported(isa))
      return Status::Error(std::string("CPU path ") + IsaName(isa) + " is not available here");
    const CpuKernels& kern = *Kernels(isa);
    if (!p.finite || !kern.all_finite(a.x, a.m * a.k, a.act == ActType::kFloat16))
      return RunCpuPlain(a);
    return a.act == ActType::kFloat32 ? Run<float>(a, p, kern, path.algo, par)
                                      : Run<uint16_t>(a, p, kern, path.algo, par);
  } catch (...) {
    return Status::Error(ExceptionMessage());
  }
}

Status RunCpu(const Args& a) noexcept {
  Status st = CheckSizes(a);
  if (!st) return st;
  if (a.m == 0 || a.n == 0) return Status::Ok();
  CpuPath path;
  st = CpuPathFromEnvironment(&path);
  if (!st) return st;
  PackedPtr packed;
  st = PackWeights(a, &packed);
  if (!st) return st;
  return RunCpuPacked(a, *packed, path, ParallelFor{});
}

}  // namespace bml
}  // namespace qexport
