// qexport::BinaryMixedLinear, CUDA kernel launchers (docs/format.md layout 1, docs/gpu.md).
// Raw device pointers + a cudaStream_t, no ONNX Runtime or TensorRT types: the ORT CUDA glue
// (ort_cuda_op.cpp) and the TensorRT plugin (trt_plugin.cpp) both call these. Plain C++
// header (compiles with g++ as well as nvcc). Every launcher is noexcept and returns a Status
// whose message names the failing CUDA call and the problem shape.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "qexport_status.h"

namespace qexport {
namespace bml {
namespace cuda {

enum class Act { kFloat32, kFloat16 };

// Which kernel Launch uses. kAuto: GEMV for m <= kGemvMaxM (when its shared memory fits),
// else the tensor-core GEMM for fp16 activations on a device of compute capability >= 8.0
// (queried once per device), else the SIMT tiled GEMM. The others force one (tests run each on
// the same inputs): kGemm is the SIMT GEMM; kGemmTc is an error for fp32 activations or an
// older device.
enum class Path { kAuto, kGemv, kGemm, kGemmTc };
constexpr int64_t kGemvMaxM = 4;

// All pointers are device pointers. fp16 tensors are raw IEEE binary16 bits (uint16_t).
struct CudaArgs {
  int64_t m = 0, k = 0, n = 0, s = 0;
  int64_t group_size = 0;  // salient_group_size (0: one group of s columns)
  Act act = Act::kFloat32;
  const void* x = nullptr;  // [m, k]
  void* y = nullptr;        // [m, n]
  const uint8_t* sign_packed = nullptr;     // [n, ceil((k - s) / 8)]
  const uint16_t* row_scale = nullptr;      // [n]
  const uint16_t* row_offset = nullptr;     // [n]
  const int32_t* salient_idx = nullptr;     // [s]
  const uint8_t* salient_packed = nullptr;  // [n, ceil(s / 2)]
  const uint16_t* salient_scale = nullptr;  // [n, groups]
  const uint8_t* salient_zero = nullptr;    // [n, groups]
  const uint16_t* r2 = nullptr;             // [k - s] or null
  const float* bias = nullptr;              // [n] or null
  // [k - s] input channel of each binary column, from LaunchPrepare (null when k == s).
  const int32_t* binary_channel = nullptr;
};

// Bit flags LaunchPrepare writes into *error_flags (device int32, zeroed by the launcher).
enum PrepareError : int32_t {
  kSalientOutOfRange = 1,     // a salient_idx value outside [0, k)
  kSalientNotIncreasing = 2,  // salient_idx not strictly increasing
  kZeroAbove15 = 4,           // a salient_zero value above 15
};

// Device bytes LaunchPrepare needs for binary_channel (k - s int32), rounded up to 256.
size_t BinaryChannelBytes(int64_t k, int64_t s) noexcept;

// Fills binary_channel[k - s] from salient_idx (clamped, so later kernels never read out of
// bounds even on invalid input) and ORs PrepareError flags into *error_flags when error_flags
// is not null (zeroed first). Asynchronous on `stream`.
Status LaunchPrepare(const int32_t* salient_idx, const uint8_t* salient_zero, int64_t k,
                     int64_t s, int64_t n, int64_t groups, int32_t* binary_channel,
                     int32_t* error_flags, cudaStream_t stream) noexcept;

// Y = op(X) for the m rows of X. Asynchronous on `stream`; errors of the launch itself come
// back (a fault inside the kernel surfaces at the next synchronizing call, as usual in CUDA).
Status Launch(const CudaArgs& args, Path path, cudaStream_t stream) noexcept;

// The kernel kAuto picks for these sizes on the current device ("gemv", "gemm_tc" or "gemm").
const char* AutoPathName(const CudaArgs& args) noexcept;

}  // namespace cuda
}  // namespace bml
}  // namespace qexport
