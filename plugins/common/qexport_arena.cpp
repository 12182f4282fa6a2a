// Huge-page backed buffers and page release (qexport_arena.h).
#include "qexport_arena.h"

#include <algorithm>
#include <cstring>
#include <mutex>
#include <new>

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

namespace qexport {
namespace {

#if defined(__linux__)
// Buffers under kLargest share 2 MiB-aligned MADV_HUGEPAGE chunks instead of mappings of their
// own: a model's many small layers (SmolLM2: 211 of 10-200 KB) then cost a handful of TLB
// entries, not one per 4 KiB (its decoded token 3-11 % faster, docs/kernels.md), and a layer's
// last partial 2 MiB is a huge page too (4096x4096: 3.4 MB, of which 1.4 MB were in 4 KiB
// pages). Bump allocation in the newest chunk; what a chunk has left when the next allocation
// does not fit is never touched, so it costs address space only. A chunk is unmapped when its
// last allocation is freed (the newest one is reused from the start instead). Never destroyed:
// kernels may outlive static destructors at exit.
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

}  // namespace

uint8_t* HugePageBuffer::Allocate(size_t bytes) {
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

void HugePageBuffer::Free() {
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

RowReleaser::RowReleaser(bool on, const void* base, int64_t row_bytes, int64_t rows)
    : on_(on && base && row_bytes > 0), base_(static_cast<const uint8_t*>(base)),
      row_bytes_(row_bytes), rows_(rows),
      chunk_(std::max<int64_t>(1, (int64_t{1} << 20) / std::max<int64_t>(1, row_bytes))) {}

void RowReleaser::Release(int64_t row) {
  ReleasePages(base_ + done_ * row_bytes_, static_cast<size_t>((row + 1 - done_) * row_bytes_));
  done_ = row + 1;
}

}  // namespace qexport
