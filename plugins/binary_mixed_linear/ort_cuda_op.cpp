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

#include <exception>
#include <mutex>
#include <string>
#include <vector>

#include "binary_mixed_linear/bml_cuda.cuh"
#include "binary_mixed_linear/bml_validate.h"
#include "qexport_contract.h"

namespace qexport {
namespace {

std::string TypeName(ONNXTensorElementDataType t) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return "float";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return "float16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: return "bfloat16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE: return "double";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8: return "uint8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8: return "int8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: return "int32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return "int64";
    default: return "element type " + std::to_string(static_cast<int>(t));
  }
}

bml::DType ToDType(ONNXTensorElementDataType t) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return bml::DType::kFloat32;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return bml::DType::kFloat16;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8: return bml::DType::kUint8;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: return bml::DType::kInt32;
    default: return bml::DType::kOther;
  }
}

std::string Prefix(const std::string& node_name) {
  return std::string(kDomain) + "::" + kOpBinaryMixedLinear + " (CUDA)" +
         (node_name.empty() ? std::string() : " node '" + node_name + "'") + ": ";
}

std::string TakeError(const OrtApi& api, OrtStatus* status) {
  if (!status) return std::string();
  std::string msg = api.GetErrorMessage(status);
  api.ReleaseStatus(status);
  return msg.empty() ? std::string("unknown ONNX Runtime error") : msg;
}

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

struct BmlCudaKernel {
  BmlCudaKernel(const OrtApi& api, bml::Attributes attrs, std::string node_name,
                ONNXTensorElementDataType act)
      : api_(api), attrs_(attrs), node_name_(std::move(node_name)), act_(act) {}

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

  OrtStatusPtr ComputeV2(OrtKernelContext* context) noexcept {
    try {
      std::string err = Compute(context);
      if (err.empty()) return nullptr;
      return api_.CreateStatus(ORT_INVALID_ARGUMENT, (Prefix(node_name_) + err).c_str());
    } catch (const std::exception& e) {
      return api_.CreateStatus(ORT_FAIL, (Prefix(node_name_) + e.what()).c_str());
    } catch (...) {
      return api_.CreateStatus(ORT_FAIL, (Prefix(node_name_) + "unknown error").c_str());
    }
  }

 private:
  std::string Compute(OrtKernelContext* ctx) {
    std::string err;
    size_t count = 0;
    if (!(err = TakeError(api_, api_.KernelContext_GetInputCount(ctx, &count))).empty())
      return err;
    std::vector<bml::TensorView> in(kNumInputs);
    for (int i = 0; i < kNumInputs; ++i) {
      if (static_cast<size_t>(i) >= count) continue;
      const OrtValue* value = nullptr;
      if (!(err = TakeError(api_, api_.KernelContext_GetInput(ctx, i, &value))).empty())
        return err;
      if (!value) continue;
      if (!(err = Describe(value, i, &in[i])).empty()) return err;
    }
    Ort::KernelContext kctx(ctx);
    cudaStream_t stream = static_cast<cudaStream_t>(kctx.GetGPUComputeStream());

    int device = 0;
    cudaError_t ce = cudaGetDevice(&device);
    if (ce != cudaSuccess) return CudaMessage("cudaGetDevice", ce);

    // Value checks on a host copy (once per weight address), then the shared validator.
    const bml::TensorView& idx = in[kInSalientIdx];
    const bml::TensorView& zero = in[kInSalientZero];
    std::lock_guard<std::mutex> lock(mutex_);
    WeightCache& c = cache_;
    const int64_t s = idx.present ? Elements(idx.shape) : 0;
    const int64_t zero_count = zero.present ? Elements(zero.shape) : 0;
    const bool hit = c.valid && c.idx_dev == idx.data && c.zero_dev == zero.data && c.s == s &&
                     c.zero_count == zero_count && c.k == attrs_.in_features &&
                     c.device == device;
    if (!hit) {
      c.valid = false;
      c.idx_host.assign(static_cast<size_t>(s), 0);
      c.zero_host.assign(static_cast<size_t>(zero_count), 0);
      // Copy only when the dtype is the expected one (else the validator rejects the dtype
      // before reading, and the byte count could exceed the tensor).
      if (idx.present && idx.dtype == bml::DType::kInt32 && s > 0) {
        ce = cudaMemcpyAsync(c.idx_host.data(), idx.data, s * sizeof(int32_t),
                             cudaMemcpyDeviceToHost, stream);
        if (ce != cudaSuccess) return CudaMessage("cudaMemcpyAsync(salient_idx to host)", ce);
      }
      if (zero.present && zero.dtype == bml::DType::kUint8 && zero_count > 0) {
        ce = cudaMemcpyAsync(c.zero_host.data(), zero.data, zero_count, cudaMemcpyDeviceToHost,
                             stream);
        if (ce != cudaSuccess) return CudaMessage("cudaMemcpyAsync(salient_zero to host)", ce);
      }
      ce = cudaStreamSynchronize(stream);
      if (ce != cudaSuccess) return CudaMessage("cudaStreamSynchronize (weight check)", ce);
    }
    std::vector<bml::TensorView> host_in = in;
    host_in[kInSalientIdx].data = c.idx_host.data();
    host_in[kInSalientZero].data = c.zero_host.data();
    bml::Args args;
    Status st = bml::ValidateInputs(attrs_, host_in, &args);
    if (!st) return st.message;
    if (ToDType(act_) != in[kInX].dtype)
      return "input 'X' (#0) is " + TypeName(act_) + " for this kernel but " +
             in[kInX].dtype_name + " at run time";

    if (!hit) {
      const int64_t k = attrs_.in_features;
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
      st = bml::cuda::LaunchPrepare(static_cast<const int32_t*>(idx.data), nullptr, k, s,
                                    attrs_.out_features, 0, c.binary_channel, nullptr, stream);
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

    std::vector<int64_t> out_shape = in[kInX].shape;
    out_shape.back() = attrs_.out_features;
    OrtValue* out = nullptr;
    if (!(err = TakeError(api_, api_.KernelContext_GetOutput(ctx, 0, out_shape.data(),
                                                            out_shape.size(), &out))).empty())
      return err;
    void* y = nullptr;
    if (!(err = TakeError(api_, api_.GetTensorMutableData(out, &y))).empty()) return err;

    bml::cuda::CudaArgs a;
    a.m = args.m;
    a.k = args.k;
    a.n = args.n;
    a.s = args.s;
    a.group_size = args.group_size;
    a.act = in[kInX].dtype == bml::DType::kFloat16 ? bml::cuda::Act::kFloat16
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
    st = bml::cuda::Launch(a, bml::cuda::Path::kAuto, stream);
    return st ? std::string() : st.message;
  }

  std::string Describe(const OrtValue* value, int index, bml::TensorView* t) {
    std::string err;
    int is_tensor = 0;
    if (!(err = TakeError(api_, api_.IsTensor(value, &is_tensor))).empty()) return err;
    if (!is_tensor)
      return std::string("input '") + bml::InputName(index) + "' (#" + std::to_string(index) +
             ") is not a tensor";
    OrtTensorTypeAndShapeInfo* info = nullptr;
    if (!(err = TakeError(api_, api_.GetTensorTypeAndShape(value, &info))).empty()) return err;
    ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
    size_t rank = 0;
    err = TakeError(api_, api_.GetTensorElementType(info, &type));
    if (err.empty()) err = TakeError(api_, api_.GetDimensionsCount(info, &rank));
    if (err.empty()) {
      t->shape.assign(rank, 0);
      err = TakeError(api_, api_.GetDimensions(info, t->shape.data(), rank));
    }
    api_.ReleaseTensorTypeAndShapeInfo(info);
    if (!err.empty()) return err;
    const void* data = nullptr;
    if (!(err = TakeError(api_, api_.GetTensorData(value, &data))).empty()) return err;
    t->present = true;
    t->dtype = ToDType(type);
    t->dtype_name = TypeName(type);
    t->data = data;
    return std::string();
  }

  const OrtApi& api_;
  bml::Attributes attrs_;
  std::string node_name_;
  ONNXTensorElementDataType act_;
  std::mutex mutex_;
  WeightCache cache_;
};

struct BmlCudaOp : Ort::CustomOpBase<BmlCudaOp, BmlCudaKernel, /*WithStatus=*/true> {
  explicit BmlCudaOp(ONNXTensorElementDataType act) : act_(act) {}

  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info,
                              void** op_kernel) const noexcept {
    std::string node_name;
    try {
      *op_kernel = nullptr;
      size_t size = 0;
      if (TakeError(api, api.KernelInfo_GetNodeName(info, nullptr, &size)).empty() && size > 1) {
        std::vector<char> buf(size);
        if (TakeError(api, api.KernelInfo_GetNodeName(info, buf.data(), &size)).empty())
          node_name.assign(buf.data());
      }
      bml::Attributes attrs;
      struct {
        const char* name;
        int64_t* value;
      } fields[] = {{kAttrInFeatures, &attrs.in_features},
                    {kAttrOutFeatures, &attrs.out_features},
                    {kAttrSalientGroupSize, &attrs.salient_group_size},
                    {kAttrLayout, &attrs.layout}};
      for (auto& f : fields) {
        std::string err = TakeError(api, api.KernelInfoGetAttribute_int64(info, f.name, f.value));
        if (!err.empty())
          return api.CreateStatus(ORT_INVALID_ARGUMENT,
                                  (Prefix(node_name) + "missing or non-int attribute '" + f.name +
                                   "' (" + err + ")").c_str());
      }
      Status st = bml::ValidateAttributes(attrs);
      if (!st)
        return api.CreateStatus(ORT_INVALID_ARGUMENT, (Prefix(node_name) + st.message).c_str());
      *op_kernel = new BmlCudaKernel(api, attrs, node_name, act_);
      return nullptr;
    } catch (const std::exception& e) {
      return api.CreateStatus(ORT_FAIL, (Prefix(node_name) + e.what()).c_str());
    } catch (...) {
      return api.CreateStatus(ORT_FAIL, (Prefix(node_name) + "unknown error").c_str());
    }
  }

  const char* GetName() const { return kOpBinaryMixedLinear; }
  const char* GetExecutionProviderType() const { return "CUDAExecutionProvider"; }

  size_t GetInputTypeCount() const { return kNumInputs; }
  ONNXTensorElementDataType GetInputType(size_t index) const {
    return index == static_cast<size_t>(kInX) ? act_ : ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const {
    return index == static_cast<size_t>(kInR2) || index == static_cast<size_t>(kInBias)
               ? OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_OPTIONAL
               : OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t /*index*/) const { return act_; }

 private:
  ONNXTensorElementDataType act_;
};

}  // namespace

void AddBinaryMixedLinearCudaOps(Ort::CustomOpDomain& domain) {
  static BmlCudaOp op_float(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
  static BmlCudaOp op_half(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16);
  domain.Add(&op_float);
  domain.Add(&op_half);
}

}  // namespace qexport
