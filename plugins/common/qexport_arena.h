// Memory for long-lived, read-mostly data that a kernel streams on every call (an op's packed
// weights), backed by transparent huge pages on Linux; and page release of source buffers that
// will not be read again. Design and measurements: docs/kernels.md (the "Packed weights" and
// "Memory" paragraphs).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace qexport {

// Zero-filled bytes. On Linux: below 16 MiB a piece of a shared 2 MiB-aligned
// MADV_HUGEPAGE chunk (a model's many small layers then cost a handful of TLB entries, not one
// per 4 KiB page); from there on an anonymous mapping of its own, 2 MiB aligned and marked
// MADV_HUGEPAGE, so that transparent huge pages back its whole 2 MiB extents (the tail stays in
// 4 KiB pages: no memory is added). A kernel that streams its weights once per call pays more
// for TLB misses with 4 KiB pages than for its lookups (measured in a KVM guest, 4096x4096
// BinaryMixedLinear at M = 1: 0.31 -> 0.17 ms with the weights in DRAM, 0.13 -> 0.10 ms in
// L3). Elsewhere: plain heap memory. 64-byte aligned.
class HugePageBuffer {
 public:
  HugePageBuffer() = default;
  HugePageBuffer(const HugePageBuffer&) = delete;
  HugePageBuffer& operator=(const HugePageBuffer&) = delete;
  ~HugePageBuffer() { Free(); }

  // Frees what the buffer held and returns `bytes` zero-filled bytes; throws std::bad_alloc.
  uint8_t* Allocate(size_t bytes);

 private:
  void Free();
  uint8_t* data_ = nullptr;
#if defined(__linux__)
  size_t size_ = 0;
  void* chunk_ = nullptr;  // the shared chunk when the bytes are a piece of one
#else
  std::vector<uint8_t> heap_;
#endif
};

// Hands the pages of [data, data + bytes) back to the OS (rounded out to whole pages) with
// madvise(MADV_PAGEOUT) (Linux 5.4+), which reclaims clean file pages at once and never loses
// data: a later read brings them back. Where it is missing or fails this does nothing.
void ReleasePages(const void* data, size_t bytes);

// Releases (ReleasePages) the rows of a row-major source as a pass over it moves past them, in
// chunks of ~1 MiB, so that the source and a copy made from it never both sit in memory whole.
class RowReleaser {
 public:
  // on = false: Done does nothing.
  RowReleaser(bool on, const void* base, int64_t row_bytes, int64_t rows);
  // Rows < row + 1 are done.
  void Done(int64_t row) {
    if (on_ && (row + 1 - done_ >= chunk_ || row + 1 == rows_)) Release(row);
  }

 private:
  void Release(int64_t row);
  bool on_;
  const uint8_t* base_;
  int64_t row_bytes_, rows_, chunk_, done_ = 0;
};

}  // namespace qexport
