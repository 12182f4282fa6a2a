// Scratch buffers of the fast BinaryMixedLinear CPU kernel, kept per thread across calls (a
// small model makes hundreds of short calls per forward; allocating these on each one showed up
// in profiles). CallScratch belongs to the thread that runs a call; TaskScratch to the thread
// running a task of it (the calling thread may run tasks too, hence two separate objects).
// Grow-only. Private to the kernel (bml_cpu_lut.cpp, bml_cpu_gemm.cpp).
#pragma once

#include <atomic>
#include <cstdint>
#include <vector>

namespace qexport {
namespace bml {

struct CallScratch {
  std::vector<float> xf;      // RunGemm: fp16 X rows of a pass as fp32
};
struct TaskScratch {
  std::vector<float> buf, acc, tables;   // RunLut: tables of a pass (small M) or a task's rows
  uint64_t stamp = 0;                    // the small-M pass whose tables `tables` holds; 0: none
  std::vector<float> panel, ctile;       // RunGemm: dequantized panel, fp32 rows for fp16 Y
};

// A number no earlier pass got (never 0).
inline uint64_t NewStamp() {
  static std::atomic<uint64_t> next{1};
  return next.fetch_add(1, std::memory_order_relaxed);
}

inline CallScratch& ThreadCallScratch() {
  thread_local CallScratch s;
  return s;
}

inline TaskScratch& ThreadTaskScratch() {
  thread_local TaskScratch s;
  return s;
}

}  // namespace bml
}  // namespace qexport
