// ONNX Runtime glue of qexport::BinaryMixedLinear, CUDA execution provider (docs/gpu.md).
//
// Same domain, op name and inputs as the CPU op (ort_op.cpp); GetExecutionProviderType is
// "CUDAExecutionProvider", so ORT hands this kernel device pointers and its compute stream
// (Ort::KernelContext::GetGPUComputeStream()).
//
// Validation: dtypes and shapes are host metadata and are checked on every call with
// bml::ValidateInputs, like the CPU op. The value checks (salient_idx strictly increasing and in
// range, zero points <= 15) need the contents, which live on the device: the kernel copies
// salient_idx and salient_zero to the host once (one stream synchronization), validates them
// with the same code and messages as the CPU op, and builds the binary-channel list on the
// device (LaunchPrepare). The result is cached per kernel, keyed by the device addresses and
// sizes of those two inputs: initializers (the exported case) never move, so later calls
// launch without synchronizing. An input that is not constant and changes in place at the same
// address is not re-validated; the kernels still clamp every index, so a bad value can produce
// wrong numbers but never an out-of-bounds read.
#include "binary_mixed_linear/ort_cuda_op.h"

#include <cuda_runtime_api.h>

#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "binary_mixed_linear/bml_contract.h"
#include "binary_mixed_linear/bml_cuda.cuh"
#include "binary_mixed_linear/ort_op_base.h"

namespace qexport {
namespace bml {
namespace ort {
namespace {

std::string CudaMessage(const char* what, cudaError_t e) {
  return std::string(what) + " failed: " + cudaGetErrorName(e) + ": " + cudaGetErrorString(e);
}

int64_t Elements(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

// Host copy of salient_idx / salient_zero and the device binary-channel list, valid for one
// (address, size) pair of each.
struct WeightCache {
  const void* idx_dev = nullptr;
  const void* zero_dev = nullptr;
  int64_t s = -1, zero_count = -1, k = -1;
  int device = -1;
  bool valid = false;
  std::vector<int32_t> idx_host;
  std::vector<uint8_t> zero_host;
  int32_t* binary_channel = nullptr;  // device, k - s entries
  size_t bc_bytes = 0;
};

struct BmlCudaKernel : KernelBase<BmlCudaKernel> {
  BmlCudaKernel(const OrtApi& api, Node node) : KernelBase(api, std::move(node)) {}

  ~BmlCudaKernel() {
    if (cache_.binary_channel) {
      int prev = -1;
      cudaGetDevice(&prev);
      if (cache_.device >= 0) cudaSetDevice(cache_.device);
      cudaFree(cache_.binary_channel);  // error ignored: nothing to report it to
      if (prev >= 0) cudaSetDevice(prev);
      cudaGetLastError();
    }
  }

  // Returns an error message, empty on success.
  std::string Compute(OrtKernelContext* ctx, const std::vector<TensorView>& in) {
    std::string err;
    Ort::KernelContext kctx(ctx);
    cudaStream_t stream = static_cast<cudaStream_t>(kctx.GetGPUComputeStream());

    int device = 0;
    cudaError_t ce = cudaGetDevice(&device);
    if (ce != cudaSuccess) return CudaMessage("cudaGetDevice", ce);

    // Value checks on a host copy (once per weight address), then the shared validator.
    const TensorView& idx = in[kInSalientIdx];
    const TensorView& zero = in[kInSalientZero];
    std::lock_guard<std::mutex> lock(mutex_);
    WeightCache& c = cache_;
    const int64_t s = idx.present ? Elements(idx.shape) : 0;
    const int64_t zero_count = zero.present ? Elements(zero.shape) : 0;
    const bool hit = c.valid && c.idx_dev == idx.data && c.zero_dev == zero.data && c.s == s &&
                     c.zero_count == zero_count && c.k == node_.attrs.in_features &&
                     c.device == device;
    if (!hit) {
      c.valid = false;
      c.idx_host.assign(static_cast<size_t>(s), 0);
      c.zero_host.assign(static_cast<size_t>(zero_count), 0);
      // Copy only when the dtype is the expected one (else the validator rejects the dtype
      // before reading, and the byte count could exceed the tensor).
      if (idx.present && idx.dtype == DType::kInt32 && s > 0) {
        ce = cudaMemcpyAsync(c.idx_host.data(), idx.data, s * sizeof(int32_t),
                             cudaMemcpyDeviceToHost, stream);
        if (ce != cudaSuccess) return CudaMessage("cudaMemcpyAsync(salient_idx to host)", ce);
      }
      if (zero.present && zero.dtype == DType::kUint8 && zero_count > 0) {
        ce = cudaMemcpyAsync(c.zero_host.data(), zero.data, zero_count, cudaMemcpyDeviceToHost,
                             stream);
        if (ce != cudaSuccess) return CudaMessage("cudaMemcpyAsync(salient_zero to host)", ce);
      }
      ce = cudaStreamSynchronize(stream);
      if (ce != cudaSuccess) return CudaMessage("cudaStreamSynchronize (weight check)", ce);
    }
    std::vector<TensorView> host_in = in;
    host_in[kInSalientIdx].data = c.idx_host.data();
    host_in[kInSalientZero].data = c.zero_host.data();
    Args args;
    if (!(err = ValidateInputs(node_, host_in, &args)).empty()) return err;

    if (!hit) {
      const int64_t k = node_.attrs.in_features;
      const size_t bytes = bml::cuda::BinaryChannelBytes(k, s);
      if (bytes > c.bc_bytes || c.device != device) {
        if (c.binary_channel) cudaFree(c.binary_channel);
        c.binary_channel = nullptr;
        c.bc_bytes = 0;
        if (bytes > 0) {
          ce = cudaMalloc(reinterpret_cast<void**>(&c.binary_channel), bytes);
          if (ce != cudaSuccess)
            return CudaMessage(("cudaMalloc(" + std::to_string(bytes) + " bytes)").c_str(), ce);
          c.bc_bytes = bytes;
        }
      }
      Status st =
          bml::cuda::LaunchPrepare(static_cast<const int32_t*>(idx.data), nullptr, k, s,
                                   node_.attrs.out_features, 0, c.binary_channel, nullptr, stream);
      if (!st) return st.message;
      ce = cudaStreamSynchronize(stream);
      if (ce != cudaSuccess) return CudaMessage("cudaStreamSynchronize (prepare)", ce);
      c.idx_dev = idx.data;
      c.zero_dev = zero.data;
      c.s = s;
      c.zero_count = zero_count;
      c.k = k;
      c.device = device;
      c.valid = true;
    }

    void* y = nullptr;
    if (!(err = AllocateOutput(api_, ctx, node_, in[kInX], &y)).empty()) return err;

    bml::cuda::CudaArgs a;
    a.m = args.m;
    a.k = args.k;
    a.n = args.n;
    a.s = args.s;
    a.group_size = args.group_size;
    a.act = in[kInX].dtype == DType::kFloat16 ? bml::cuda::Act::kFloat16
                                              : bml::cuda::Act::kFloat32;
    a.x = in[kInX].data;
    a.y = y;
    a.sign_packed = static_cast<const uint8_t*>(in[kInSignPacked].data);
    a.row_scale = static_cast<const uint16_t*>(in[kInRowScale].data);
    a.row_offset = static_cast<const uint16_t*>(in[kInRowOffset].data);
    a.salient_idx = static_cast<const int32_t*>(idx.data);
    a.salient_packed = static_cast<const uint8_t*>(in[kInSalientPacked].data);
    a.salient_scale = static_cast<const uint16_t*>(in[kInSalientScale].data);
    a.salient_zero = static_cast<const uint8_t*>(zero.data);
    a.r2 = in[kInR2].present ? static_cast<const uint16_t*>(in[kInR2].data) : nullptr;
    a.bias = in[kInBias].present ? static_cast<const float*>(in[kInBias].data) : nullptr;
    a.binary_channel = c.binary_channel;
    Status st = bml::cuda::Launch(a, bml::cuda::Path::kAuto, stream);
    return st ? std::string() : st.message;
  }

 private:
  std::mutex mutex_;
  WeightCache cache_;
};

struct BmlCudaOp : OpBase<BmlCudaOp, BmlCudaKernel> {
  explicit BmlCudaOp(ONNXTensorElementDataType act)
      : OpBase(act, "CUDAExecutionProvider", " (CUDA)") {}

  static std::string MakeKernel(const OrtApi& api, const OrtKernelInfo* /*info*/,
                                const Node& node, BmlCudaKernel** kernel) {
    *kernel = new BmlCudaKernel(api, node);
    return std::string();
  }
};

}  // namespace
}  // namespace ort
}  // namespace bml

void AddBinaryMixedLinearCudaOps(Ort::CustomOpDomain& domain) {
  bml::ort::AddOps<bml::ort::BmlCudaOp>(domain);
}

}  // namespace qexport
