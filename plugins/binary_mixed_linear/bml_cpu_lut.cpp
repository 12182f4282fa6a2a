// qexport::BinaryMixedLinear CPU kernel: lookup tables over the packed weights, fp32
// accumulation (docs/kernels.md has the design and the measurements).
//
// Weights, packed once from layout 1 (PackWeights; the ORT glue caches them for constant
// initializers):
// - output rows in blocks of 16 (N padded with zero rows);
// - binary part: for block nb, sign byte b (binary columns 8b..8b+7), row r: the layout-1
//   byte sign_packed[16 nb + r, b] at wb[(nb * kb_bytes + b) * 16 + r]: one 16-byte load
//   gives the byte of 16 rows;
// - salient part: the same [block][byte][16 rows] order over the 4-bit codes, each group's
//   columns padded to an even count so that no byte straddles two groups;
// - fp16 parameters as fp32, per-group scales as [group][N] rows.
// Per row of X (the activation side, built every call):
// - binary: x_b = X[binary channels] * r2 in groups of 4; a 16-entry table per group holds
//   the 16 sums +-x0 +-x1 +-x2 +-x3, and a sign nibble of a row is the index of its term, so
//   sum_c sign[n, c] x_b[c] is one table lookup and one add per 4 weights;
// - salient: a 16-entry table per salient column holds q * x[j] for q = 0..15, so a 4-bit
//   code is one lookup; per group, y += scale * sum_j q x[j] - scale * zero * sum_j x[j].
// The per-ISA loops (bml_cpu_kernels_*.cpp) do 16 lookups per instruction (vpermps).
// Work is split over tiles of (rows of X) x (output rows); the table of a row of X is built
// once and reused by every output row. Inputs or parameters that are not finite go to the
// plain kernel (RunCpuPlain), where no reordering can turn an infinity into NaN.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>
#include <string>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

#include "binary_mixed_linear/bml_cpu.h"
#include "binary_mixed_linear/bml_cpu_kernels.h"

namespace qexport {
namespace bml {

struct PackedWeights {
  int64_t k = 0, n = 0, s = 0, kb = 0, group_size = 0, groups = 0;
  int64_t nblk = 0, npad = 0;
  int64_t kb_bytes = 0;               // ceil(kb / 8)
  std::vector<uint8_t> wb;            // [nblk][kb_bytes][16]
  std::vector<int32_t> bin_chan;      // [kb] input channel of each binary column
  std::vector<float> r2;              // [kb]; empty: all ones
  std::vector<float> rs, ro;          // [npad]
  int64_t s_bytes = 0;                // bytes per row of packed codes (groups padded to even)
  std::vector<uint8_t> ws;            // [nblk][s_bytes][16]
  std::vector<int32_t> slot_chan;     // [2 s_bytes] input channel of each code slot; -1: pad
  std::vector<int64_t> group_byte;    // [groups + 1] first byte of each group
  std::vector<float> sscale, szero;   // [groups][npad]: scale, scale * zero
  bool has_zero = false;              // some zero point is not 0
  std::vector<float> bias;            // [npad]; empty: none
  bool finite = true;                 // every fp16 parameter finite
};

namespace {

using detail::CpuKernels;
using detail::kMaxBlocks;
using detail::kRowBlock;

bool FiniteHalf(uint16_t h) { return (h & 0x7c00u) != 0x7c00u; }

bool CpuHas(Isa isa) {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  switch (isa) {
    case Isa::kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case Isa::kAvx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma");
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
  for (int64_t c = 0; c < a.k; ++c)
    if (!is_salient[c]) p->bin_chan.push_back(static_cast<int32_t>(c));

  auto half_row = [&](const uint16_t* src, int64_t count, std::vector<float>* dst) {
    dst->assign(static_cast<size_t>(npad), 0.0f);
    for (int64_t i = 0; i < count; ++i) {
      p->finite = p->finite && FiniteHalf(src[i]);
      (*dst)[i] = HalfToFloat(src[i]);
    }
  };
  half_row(a.row_scale, n, &p->rs);
  half_row(a.row_offset, n, &p->ro);
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

  // Binary signs: [block][byte][16 rows], the bytes of layout 1 unchanged.
  p->kb_bytes = (p->kb + 7) / 8;
  const int64_t kbb = p->kb_bytes;
  p->wb.assign(static_cast<size_t>(p->nblk * kbb * kRowBlock), 0);
  RowReleaser sign_release(release, a.sign_packed, kbb, n);
  for (int64_t row = 0; row < n; ++row) {
    const uint8_t* src = a.sign_packed + row * kbb;
    uint8_t* dst = p->wb.data() + (row / kRowBlock) * kbb * kRowBlock + row % kRowBlock;
    for (int64_t b = 0; b < kbb; ++b) dst[b * kRowBlock] = src[b];
    sign_release.Done(row);
  }

  // Salient codes: groups padded to an even number of columns.
  const int64_t groups = p->groups;
  p->group_byte.assign(static_cast<size_t>(groups + 1), 0);
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t cnt = std::min(a.s, (g + 1) * gsz) - g * gsz;
    p->group_byte[g + 1] = p->group_byte[g] + (cnt + 1) / 2;
  }
  p->s_bytes = p->group_byte[groups];
  p->slot_chan.assign(static_cast<size_t>(2 * p->s_bytes), -1);
  std::vector<int64_t> slot_of(static_cast<size_t>(a.s));
  for (int64_t j = 0; j < a.s; ++j) {
    const int64_t g = j / gsz;
    slot_of[j] = 2 * p->group_byte[g] + (j - g * gsz);
    p->slot_chan[slot_of[j]] = a.salient_idx[j];
  }
  const int64_t sb = p->s_bytes, sal_bytes = (a.s + 1) / 2;
  p->ws.assign(static_cast<size_t>(p->nblk * sb * kRowBlock), 0);
  RowReleaser code_release(release, a.salient_packed, sal_bytes, n);
  for (int64_t row = 0; row < n; ++row) {
    const uint8_t* src = a.salient_packed + row * sal_bytes;
    uint8_t* dst = p->ws.data() + (row / kRowBlock) * sb * kRowBlock + row % kRowBlock;
    for (int64_t j = 0; j < a.s; ++j) {
      const int q = (src[j >> 1] >> ((j & 1) * 4)) & 0xf;
      const int64_t slot = slot_of[j];
      dst[(slot >> 1) * kRowBlock] |= static_cast<uint8_t>(q << ((slot & 1) * 4));
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

template <typename T>
bool AllFinite(const T* x, int64_t count);
template <>
bool AllFinite(const float* x, int64_t count) {
  uint32_t bad = 0;
  for (int64_t i = 0; i < count; ++i) {
    uint32_t b;
    std::memcpy(&b, x + i, 4);
    bad |= static_cast<uint32_t>((b & 0x7f800000u) == 0x7f800000u);
  }
  return bad == 0;
}
template <>
bool AllFinite(const uint16_t* x, int64_t count) {
  uint32_t bad = 0;
  for (int64_t i = 0; i < count; ++i) bad |= static_cast<uint32_t>((x[i] & 0x7c00u) == 0x7c00u);
  return bad == 0;
}

inline float LoadF(const float* p, int64_t i) { return p[i]; }
inline float LoadF(const uint16_t* p, int64_t i) { return HalfToFloat(p[i]); }
inline void StoreF(float* p, int64_t i, float v) { p[i] = v; }
inline void StoreF(uint16_t* p, int64_t i, float v) { p[i] = FloatToHalf(v); }

constexpr int64_t kChunkBytes = 64;         // K chunk: 512 binary / 128 salient columns
constexpr int64_t kTableBudget = 8 << 20;   // bytes of tables per pass over rows of X

// Scratch buffers kept per thread across calls (a small model makes hundreds of short calls
// per forward; allocating these on each one showed up in profiles). CallScratch belongs to
// the thread that runs Run; TaskScratch to the thread running a task (the calling thread
// may run tasks too, hence two separate objects). Grow-only.
struct CallScratch {
  std::vector<float> tables;
};
struct TaskScratch {
  std::vector<float> buf, acc_b, acc_s;
};
CallScratch& ThreadCallScratch() {
  thread_local CallScratch s;
  return s;
}
TaskScratch& ThreadTaskScratch() {
  thread_local TaskScratch s;
  return s;
}

template <typename T>
Status Run(const Args& a, const PackedWeights& p, const CpuKernels& kern,
           const ParallelFor& par) {
  const int64_t m = a.m, k = a.k, npad = p.npad, groups = p.groups;
  const int64_t kbb = p.kb_bytes, sb = p.s_bytes;
  const int64_t lutb_size = 2 * kbb * 16, luts_size = 2 * sb * 16;
  const int64_t row_table = lutb_size + luts_size + 1 + groups;  // floats per row of X
  const int64_t mp = std::max<int64_t>(
      1, std::min<int64_t>(m, kTableBudget / static_cast<int64_t>(4 * row_table)));
  // Every float of a row's tables is written before it is read: no clearing needed.
  std::vector<float>& tables = ThreadCallScratch().tables;
  if (tables.size() < static_cast<size_t>(mp * row_table))
    tables.resize(static_cast<size_t>(mp * row_table));
  const T* x = static_cast<const T*>(a.x);
  T* y = static_cast<T*>(a.y);

  for (int64_t pm0 = 0; pm0 < m; pm0 += mp) {
    const int64_t pm = std::min(mp, m - pm0);
    // Tables of each row of X: [lutb | luts | sum_b | xsum per group].
    Status st = ParallelRun(par, static_cast<size_t>(pm), [&](size_t i) {
      const int64_t r = pm0 + static_cast<int64_t>(i);
      const T* xr = x + r * k;
      float* t = tables.data() + static_cast<int64_t>(i) * row_table;
      std::vector<float>& buf = ThreadTaskScratch().buf;
      buf.assign(static_cast<size_t>(std::max(8 * kbb, 2 * sb)), 0.0f);
      float sum_b = 0.0f;
      for (int64_t c = 0; c < p.kb; ++c) {
        const float v = LoadF(xr, p.bin_chan[c]) * (p.r2.empty() ? 1.0f : p.r2[c]);
        buf[c] = v;
        sum_b += v;
      }
      kern.sign_lut(buf.data(), 2 * kbb, t);
      std::fill(buf.begin(), buf.end(), 0.0f);
      for (int64_t slot = 0; slot < 2 * sb; ++slot)
        if (p.slot_chan[slot] >= 0) buf[slot] = LoadF(xr, p.slot_chan[slot]);
      kern.code_lut(buf.data(), 2 * sb, t + lutb_size);
      float* tail = t + lutb_size + luts_size;
      tail[0] = sum_b;
      for (int64_t g = 0; g < groups; ++g) {
        float xs = 0.0f;
        for (int64_t slot = 2 * p.group_byte[g]; slot < 2 * p.group_byte[g + 1]; ++slot)
          xs += buf[slot];
        tail[1 + g] = xs;
      }
    });
    if (!st) return st;

    // Tiles: mb rows of X x nrb blocks of 16 output rows. Small M: short tiles over N, the
    // weights stream once. Large M: 8 rows of X (their tables, ~100 KB a row at K = 4096,
    // stay in L2) x 1024 output rows, so each table is read N / 1024 times in all.
    const int64_t mb = std::min<int64_t>(pm, 8);
    const int64_t nrb = pm <= 4 ? kMaxBlocks : 16 * kMaxBlocks;
    const int64_t m_tiles = (pm + mb - 1) / mb, n_tiles = (p.nblk + nrb - 1) / nrb;
    st = ParallelRun(par, static_cast<size_t>(m_tiles * n_tiles), [&](size_t item) {
      const int64_t mt = static_cast<int64_t>(item) / n_tiles;
      const int64_t nt = static_cast<int64_t>(item) % n_tiles;
      const int64_t m0 = mt * mb, m1 = std::min(pm, m0 + mb);
      const int64_t nb0 = nt * nrb, nb1 = std::min(p.nblk, nb0 + nrb);
      const int64_t width = (nb1 - nb0) * kRowBlock;
      TaskScratch& scratch = ThreadTaskScratch();
      std::vector<float>& acc_b = scratch.acc_b;
      std::vector<float>& acc_s = scratch.acc_s;
      acc_b.assign(static_cast<size_t>((m1 - m0) * width), 0.0f);
      acc_s.assign(static_cast<size_t>((m1 - m0) * width), 0.0f);
      for (int64_t c0 = 0; c0 < kbb; c0 += kChunkBytes) {
        const int64_t len = std::min(kChunkBytes, kbb - c0);
        for (int64_t r = m0; r < m1; ++r) {
          const float* lut = tables.data() + r * row_table + 32 * c0;
          float* out = acc_b.data() + (r - m0) * width;
          for (int64_t nb = nb0; nb < nb1; nb += kMaxBlocks) {
            const int cnt = static_cast<int>(std::min<int64_t>(kMaxBlocks, nb1 - nb));
            kern.lut_dot(p.wb.data() + (nb * kbb + c0) * kRowBlock, kbb * kRowBlock, cnt, lut,
                         len, out + (nb - nb0) * kRowBlock, nullptr);
          }
        }
      }
      for (int64_t g = 0; g < groups; ++g) {
        const float* scale = p.sscale.data() + g * npad;
        for (int64_t c0 = p.group_byte[g]; c0 < p.group_byte[g + 1]; c0 += kChunkBytes) {
          const int64_t len = std::min(kChunkBytes, p.group_byte[g + 1] - c0);
          for (int64_t r = m0; r < m1; ++r) {
            const float* lut = tables.data() + r * row_table + lutb_size + 32 * c0;
            float* out = acc_s.data() + (r - m0) * width;
            for (int64_t nb = nb0; nb < nb1; nb += kMaxBlocks) {
              const int cnt = static_cast<int>(std::min<int64_t>(kMaxBlocks, nb1 - nb));
              kern.lut_dot(p.ws.data() + (nb * sb + c0) * kRowBlock, sb * kRowBlock, cnt, lut,
                           len, out + (nb - nb0) * kRowBlock, scale + nb * kRowBlock);
            }
          }
        }
      }
      // Epilogue: y = row_scale * dot + row_offset * sum_b + salient - zero terms + bias.
      const int64_t n0 = nb0 * kRowBlock, n1 = std::min(p.n, nb1 * kRowBlock);
      for (int64_t r = m0; r < m1; ++r) {
        const float* tail = tables.data() + r * row_table + lutb_size + luts_size;
        float* ab = acc_b.data() + (r - m0) * width;
        const float* as = acc_s.data() + (r - m0) * width;
        const float sum_b = tail[0];
        for (int64_t j = 0; j < width; ++j)
          ab[j] = p.rs[n0 + j] * ab[j] + p.ro[n0 + j] * sum_b + as[j];
        if (p.has_zero) {
          for (int64_t g = 0; g < groups; ++g) {
            const float xs = tail[1 + g];
            const float* sz = p.szero.data() + g * npad + n0;
            for (int64_t j = 0; j < width; ++j) ab[j] -= sz[j] * xs;
          }
        }
        if (!p.bias.empty())
          for (int64_t j = 0; j < width; ++j) ab[j] += p.bias[n0 + j];
        const int64_t row = pm0 + r;
        for (int64_t o = n0; o < n1; ++o) StoreF(y, row * p.n + o, ab[o - n0]);
      }
    });
    if (!st) return st;
  }
  return Status::Ok();
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

Status RunCpuPacked(const Args& a, const PackedWeights& p, Isa isa,
                    const ParallelFor& par) noexcept {
  try {
    Status st = CheckSizes(a);
    if (!st) return st;
    if (a.k != p.k || a.n != p.n || a.s != p.s || a.group_size != p.group_size)
      return Status::Error("packed weights were built for other sizes");
    if (a.m == 0 || a.n == 0) return Status::Ok();
    if (!a.x || !a.y) return Status::Error("a required input pointer is null");
    const bool finite = a.act == ActType::kFloat32
                            ? AllFinite(static_cast<const float*>(a.x), a.m * a.k)
                            : AllFinite(static_cast<const uint16_t*>(a.x), a.m * a.k);
    if (!finite || !p.finite) return RunCpuPlain(a);
    if (isa == Isa::kAuto) isa = BestIsa();
    if (!IsaSupported(isa))
      return Status::Error(std::string("CPU path ") + IsaName(isa) + " is not available here");
    const CpuKernels& kern = *Kernels(isa);
    return a.act == ActType::kFloat32 ? Run<float>(a, p, kern, par)
                                      : Run<uint16_t>(a, p, kern, par);
  } catch (...) {
    return Status::Error(ExceptionMessage());
  }
}

Status RunCpu(const Args& a) noexcept {
  Status st = CheckSizes(a);
  if (!st) return st;
  if (a.m == 0 || a.n == 0) return Status::Ok();
  Isa isa;
  st = IsaFromEnvironment(&isa);
  if (!st) return st;
  PackedPtr packed;
  st = PackWeights(a, &packed);
  if (!st) return st;
  return RunCpuPacked(a, *packed, isa, ParallelFor{});
}

}  // namespace bml
}  // namespace qexport
