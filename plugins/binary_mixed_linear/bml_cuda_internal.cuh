// What the CUDA files of qexport::BinaryMixedLinear share (private to bml_cuda*.cu): element
// load/store on the device, launch-error messages, and the launcher of the tensor-core GEMM
// (bml_cuda_gemm_tc.cu), which bml_cuda.cu's Launch dispatches to.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "binary_mixed_linear/bml_cuda.cuh"
#include "qexport_status.h"

namespace qexport {
namespace bml {
namespace cuda {
namespace detail {

__device__ __forceinline__ float Load(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float Load(const uint16_t* p, int64_t i) {
  return __half2float(__ushort_as_half(p[i]));
}
__device__ __forceinline__ float Half(const uint16_t* p, int64_t i) {
  return __half2float(__ushort_as_half(__ldg(p + i)));
}
__device__ __forceinline__ void Store(float* p, int64_t i, float v) { p[i] = v; }
__device__ __forceinline__ void Store(uint16_t* p, int64_t i, float v) {
  p[i] = __half_as_ushort(__float2half_rn(v));
}

// "(M=.., K=.., N=.., S=.., G=.., fp16|fp32)": the problem, for messages.
inline std::string Shape(const CudaArgs& a) {
  return "(M=" + std::to_string(a.m) + ", K=" + std::to_string(a.k) + ", N=" +
         std::to_string(a.n) + ", S=" + std::to_string(a.s) + ", G=" +
         std::to_string(a.group_size) + ", " + (a.act == Act::kFloat16 ? "fp16" : "fp32") + ")";
}

inline Status CudaError(const char* what, cudaError_t e, const std::string& shape) {
  return Status::Error(std::string("CUDA ") + what + " failed " + shape + ": " +
                       cudaGetErrorName(e) + ": " + cudaGetErrorString(e));
}

#define QEXPORT_CUDA_CHECK(call, what, shape)          \
  do {                                                 \
    const cudaError_t qexport_err_ = (call);           \
    if (qexport_err_ != cudaSuccess)                   \
      return CudaError(what, qexport_err_, shape);     \
  } while (0)

// Launches GemmTcKernel (fp16 activations, compute capability >= 8.0: the caller checks).
Status LaunchGemmTc(const CudaArgs& a, cudaStream_t stream, const std::string& shape);

}  // namespace detail
}  // namespace cuda
}  // namespace bml
}  // namespace qexport
