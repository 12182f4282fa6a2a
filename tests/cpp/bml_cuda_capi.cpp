// ctypes entry points into the CUDA launchers (bml_cuda.cuh) for tests/test_gpu_kernels.py and
// benchmarks/bench_cuda.py: host arrays in, host arrays out. Built by CMake with
// QEXPORT_BUILD_CUDA=ON and QEXPORT_BUILD_TESTS=ON (libqexport_cuda_testlib.so). Running it
// needs a CUDA GPU; qx_cuda_device_count() says whether there is one.
#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "binary_mixed_linear/bml_cuda.cuh"
#include "binary_mixed_linear/bml_unpack.h"

namespace {

namespace cu = qexport::bml::cuda;
namespace up = qexport::bml::unpack;

void SetError(char* err, int64_t len, const std::string& msg) {
  if (!err || len <= 0) return;
  std::strncpy(err, msg.c_str(), static_cast<size_t>(len - 1));
  err[len - 1] = '\0';
}

struct Buffers {
  std::vector<void*> ptrs;
  ~Buffers() {
    for (void* p : ptrs) cudaFree(p);
  }
  // Device copy of `bytes` host bytes (null host pointer: null device pointer).
  bool Upload(const void* host, size_t bytes, const void** dev, std::string* err) {
    *dev = nullptr;
    if (!host) return true;
    void* p = nullptr;
    cudaError_t e = cudaMalloc(&p, bytes ? bytes : 1);
    if (e != cudaSuccess) {
      *err = std::string("cudaMalloc: ") + cudaGetErrorString(e);
      return false;
    }
    ptrs.push_back(p);
    if (bytes && (e = cudaMemcpy(p, host, bytes, cudaMemcpyHostToDevice)) != cudaSuccess) {
      *err = std::string("cudaMemcpy: ") + cudaGetErrorString(e);
      return false;
    }
    *dev = p;
    return true;
  }
};

}  // namespace

extern "C" {

__attribute__((visibility("default"))) int qx_cuda_device_count(char* err, int64_t err_len) {
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess) {
    SetError(err, err_len, std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e));
    cudaGetLastError();
    return 0;
  }
  return count;
}

// Compute capability of device 0 as major * 10 + minor, or -1 (no device / error).
__attribute__((visibility("default"))) int qx_cuda_compute_capability() {
  int major = 0, minor = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, 0) != cudaSuccess) {
    cudaGetLastError();
    return -1;
  }
  return major * 10 + minor;
}

// The kernel Path::kAuto picks for these sizes on the current device ("gemv", "gemm_tc",
// "gemm"). act: 0 fp32, 1 fp16.
__attribute__((visibility("default"))) const char* qx_bml_cuda_auto_path(
    int64_t m, int64_t k, int64_t n, int64_t s, int64_t group_size, int act) {
  cu::CudaArgs a;
  a.m = m; a.k = k; a.n = n; a.s = s; a.group_size = group_size;
  a.act = act == 1 ? cu::Act::kFloat16 : cu::Act::kFloat32;
  return cu::AutoPathName(a);
}

// Runs LaunchPrepare (with validation flags) and Launch on the given host arrays; writes y and
// *flags. path: 0 auto, 1 gemv, 2 gemm (SIMT), 3 gemm_tc (tensor cores). act: 0 fp32, 1 fp16. repeat > 1 times the launch
// (returns the mean milliseconds per launch in *ms). Returns 0 on success, else -1 with err.
__attribute__((visibility("default"))) int qx_bml_cuda_run(
    int64_t m, int64_t k, int64_t n, int64_t s, int64_t group_size, int act, int path,
    const void* x, void* y, const uint8_t* sign_packed, const uint16_t* row_scale,
    const uint16_t* row_offset, const int32_t* salient_idx, const uint8_t* salient_packed,
    const uint16_t* salient_scale, const uint8_t* salient_zero, const uint16_t* r2,
    const float* bias, int32_t* flags, int repeat, float* ms, char* err, int64_t err_len) {
  std::string msg;
  Buffers b;
  const size_t es = act == 1 ? 2 : 4;
  const int64_t kb = k - s, groups = up::NumGroups(s, group_size);
  cu::CudaArgs a;
  a.m = m; a.k = k; a.n = n; a.s = s; a.group_size = group_size;
  a.act = act == 1 ? cu::Act::kFloat16 : cu::Act::kFloat32;
  const void *dx, *dsign, *drs, *dro, *didx, *dsp, *dss, *dsz, *dr2, *dbias;
  if (!b.Upload(x, m * k * es, &dx, &msg) ||
      !b.Upload(sign_packed, n * up::CeilDiv(kb, 8), &dsign, &msg) ||
      !b.Upload(row_scale, n * 2, &drs, &msg) || !b.Upload(row_offset, n * 2, &dro, &msg) ||
      !b.Upload(salient_idx, s * 4, &didx, &msg) ||
      !b.Upload(salient_packed, n * up::SalientBytes(s), &dsp, &msg) ||
      !b.Upload(salient_scale, n * groups * 2, &dss, &msg) ||
      !b.Upload(salient_zero, n * groups, &dsz, &msg) || !b.Upload(r2, kb * 2, &dr2, &msg) ||
      !b.Upload(bias, n * 4, &dbias, &msg)) {
    SetError(err, err_len, msg);
    return -1;
  }
  std::vector<char> zeros(static_cast<size_t>(m * n * es + cu::BinaryChannelBytes(k, s) + 4), 0);
  const void *dy, *dbc, *dflags;
  if (!b.Upload(zeros.data(), m * n * es, &dy, &msg) ||
      !b.Upload(zeros.data(), cu::BinaryChannelBytes(k, s), &dbc, &msg) ||
      !b.Upload(zeros.data(), 4, &dflags, &msg)) {
    SetError(err, err_len, msg);
    return -1;
  }
  a.x = dx; a.y = const_cast<void*>(dy);
  a.sign_packed = static_cast<const uint8_t*>(dsign);
  a.row_scale = static_cast<const uint16_t*>(drs);
  a.row_offset = static_cast<const uint16_t*>(dro);
  a.salient_idx = static_cast<const int32_t*>(didx);
  a.salient_packed = static_cast<const uint8_t*>(dsp);
  a.salient_scale = static_cast<const uint16_t*>(dss);
  a.salient_zero = static_cast<const uint8_t*>(dsz);
  a.r2 = static_cast<const uint16_t*>(dr2);
  a.bias = static_cast<const float*>(dbias);
  a.binary_channel = kb > 0 ? static_cast<const int32_t*>(dbc) : nullptr;
  cudaStream_t stream = nullptr;
  qexport::Status st = cu::LaunchPrepare(a.salient_idx, a.salient_zero, k, s, n, groups,
                                         const_cast<int32_t*>(a.binary_channel),
                                         static_cast<int32_t*>(const_cast<void*>(dflags)), stream);
  const cu::Path p = path == 1   ? cu::Path::kGemv
                     : path == 2 ? cu::Path::kGemm
                     : path == 3 ? cu::Path::kGemmTc
                                 : cu::Path::kAuto;
  if (st) st = cu::Launch(a, p, stream);
  if (!st) {
    SetError(err, err_len, st.message);
    return -1;
  }
  cudaError_t e = cudaStreamSynchronize(stream);
  if (e == cudaSuccess && repeat > 1) {
    cudaEvent_t start, stop;
    cudaEventCreate(&start);
    cudaEventCreate(&stop);
    cudaEventRecord(start, stream);
    for (int i = 0; i < repeat && st; ++i) st = cu::Launch(a, p, stream);
    cudaEventRecord(stop, stream);
    e = cudaEventSynchronize(stop);
    float total = 0.0f;
    cudaEventElapsedTime(&total, start, stop);
    if (ms) *ms = total / repeat;
    cudaEventDestroy(start);
    cudaEventDestroy(stop);
    if (!st) {
      SetError(err, err_len, st.message);
      return -1;
    }
  }
  if (e == cudaSuccess) e = cudaMemcpy(y, dy, m * n * es, cudaMemcpyDeviceToHost);
  if (e == cudaSuccess && flags) e = cudaMemcpy(flags, dflags, 4, cudaMemcpyDeviceToHost);
  if (e != cudaSuccess) {
    SetError(err, err_len, std::string("after the kernels: ") + cudaGetErrorName(e) + ": " +
                               cudaGetErrorString(e) + " " + std::to_string(m) + "x" +
                               std::to_string(k) + "x" + std::to_string(n));
    return -1;
  }
  return 0;
}

}  // extern "C"
