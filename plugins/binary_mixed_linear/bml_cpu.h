// qexport::BinaryMixedLinear, CPU kernel launcher (docs/format.md, layout 1).
// Raw pointers and sizes only: no ONNX Runtime types, so the same launcher serves any glue.
// Implemented by bml_cpu_pack.cpp (PackWeights), bml_cpu_dispatch.cpp (ISA and algorithm
// choice, RunCpuPacked, RunCpu) and bml_cpu.cpp (RunCpuPlain); docs/kernels.md.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "qexport_parallel.h"
#include "qexport_status.h"

namespace qexport {
namespace bml {

enum class ActType { kFloat32, kFloat16 };

// One call computes Y[m, :] = op(X[m, :]) for the M rows of X flattened over its leading dims.
// fp16 tensors (row_scale, row_offset, salient_scale, r2, and X/Y when act == kFloat16) are
// passed as raw IEEE binary16 bits (uint16_t).
struct Args {
  int64_t m = 0;           // rows of X (product of leading dims; may be 0)
  int64_t k = 0;           // in_features
  int64_t n = 0;           // out_features
  int64_t s = 0;           // number of salient channels
  int64_t group_size = 0;  // salient_group_size; 0: one group of s columns
  ActType act = ActType::kFloat32;

  const void* x = nullptr;                // [m, k], float or fp16 bits
  void* y = nullptr;                      // [m, n], same type as x
  const uint8_t* sign_packed = nullptr;   // [n, ceil((k - s) / 8)]
  const uint16_t* row_scale = nullptr;    // [n] fp16
  const uint16_t* row_offset = nullptr;   // [n] fp16
  const int32_t* salient_idx = nullptr;   // [s], strictly increasing in [0, k)
  const uint8_t* salient_packed = nullptr;  // [n, ceil(s / 2)]
  const uint16_t* salient_scale = nullptr;  // [n, groups] fp16
  const uint8_t* salient_zero = nullptr;    // [n, groups]
  const uint16_t* r2 = nullptr;           // [k - s] fp16, or null (all ones)
  const float* bias = nullptr;            // [n] float, or null
};

// Number of salient groups per row: ceil(s / g) with g = group_size or s; 0 when s == 0.
inline int64_t NumGroups(int64_t s, int64_t group_size) {
  if (s <= 0) return 0;
  const int64_t g = group_size > 0 ? group_size : s;
  return 1 + (s - 1) / g;  // ceil(s / g); s + g - 1 would overflow for a huge group size
}

// Instruction-set paths of the CPU kernel (docs/kernels.md). kAuto: the best the CPU has.
enum class Isa { kAuto, kPortable, kAvx2, kAvx512 };

// Environment variable that forces a path: portable | avx2 | avx512 (unset or "auto": best).
constexpr const char* kIsaEnv = "QEXPORT_CPU_ISA";

const char* IsaName(Isa isa);
bool IsaSupported(Isa isa);  // compiled in and the CPU has it (kAuto, kPortable: always)
Isa BestIsa();
// `name` (e.g. the value of QEXPORT_CPU_ISA; null or empty: auto) to the path to run; an error
// names the value and what the CPU offers when it is unknown or the CPU lacks it.
Status ResolveIsa(const char* name, Isa* out);
// ResolveIsa(getenv(kIsaEnv)).
Status IsaFromEnvironment(Isa* out);

// Which algorithm serves a call (docs/kernels.md): auto: lookup tables, or for large M
// dequantized panels + GEMM where that was measured faster on the ISA path; tables: the
// tables at every M; gemm: the GEMM at every M (on a path that has one; portable has not).
// For tests and benchmarks.
enum class Algo { kAuto, kTables, kGemm };

// Environment variable that forces one: auto | tables | gemm (unset: auto).
constexpr const char* kAlgoEnv = "QEXPORT_CPU_ALGO";

// The CPU kernel's choices, fixed per kernel (at session creation).
struct CpuPath {
  Isa isa = Isa::kAuto;
  Algo algo = Algo::kAuto;
};

// The ISA (kIsaEnv) and algorithm (kAlgoEnv) the environment asks for; an error names the
// variable, its value and what is allowed.
Status CpuPathFromEnvironment(CpuPath* out);

// Weights rearranged for the fast kernels (layout: bml_cpu_internal.h): built once from layout 1
// (constant initializers: once per kernel) and read by every call.
struct PackedWeights;
using PackedPtr = std::shared_ptr<const PackedWeights>;

// Builds the packed form of the weights in `args` (everything but x, y and m). Same checks
// as RunCpu; never throws. release_source: the weight inputs will not be read again (constant
// initializers, packed once): as packing goes, their pages are handed back to the OS with
// madvise(MADV_PAGEOUT) where available. A hint only, safe for any memory (a later read
// brings the data back: file pages from the file, anonymous ones from swap, and without swap
// anonymous pages simply stay); it keeps a model whose weights ONNX Runtime maps from an
// external data file from holding both the mapped and the packed copy (docs/kernels.md).
// The packed form suits the ISA path `isa` (kAuto: the best; paths differ in the order of
// bytes within a line): RunCpuPacked must run the same path, else it returns an error.
Status PackWeights(const Args& args, PackedPtr* out, bool release_source = false,
                   Isa isa = Isa::kAuto) noexcept;

// Runs the kernel on weights packed by PackWeights from the same weight inputs, on the given
// path (kAuto: best ISA, measured crossover), spreading the work with `parallel`
// (qexport_parallel.h). Never throws.
Status RunCpuPacked(const Args& args, const PackedWeights& packed, const CpuPath& path,
                    const ParallelFor& parallel) noexcept;

// Runs the kernel: packs the weights, then RunCpuPacked on the path the environment asks
// for (CpuPathFromEnvironment; by default the best), serially. Re-checks what memory safety
// depends on (sizes, salient_idx order and range) and returns an error instead of reading
// out of bounds; full input validation against the contract is bml_validate.h. Never throws.
Status RunCpu(const Args& args) noexcept;

// The plain reference-order kernel (no tables, no threads): used for activations or weight
// parameters that are not finite, where the table kernels' reordering would turn an
// infinity into NaN. Never throws.
Status RunCpuPlain(const Args& args) noexcept;

}  // namespace bml
}  // namespace qexport
