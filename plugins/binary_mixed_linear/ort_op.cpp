// ONNX Runtime glue of qexport::BinaryMixedLinear (CPU execution provider).
//
// X and Y are typed (one op object for float, one for float16); the weight inputs are declared
// with an undefined element type so that a wrong dtype reaches bml::ValidateInputs and comes
// back as a message naming the input, instead of a generic schema error. Attributes are read
// and checked once at kernel creation; inputs are checked on every call (cheap next to the
// product). All entry points are noexcept and report failures as OrtStatus.
//
// CPU speed (docs/kernels.md): the ISA path is chosen at kernel creation (QEXPORT_CPU_ISA
// forces one; a path the CPU lacks fails the session with a message); the weights are
// packed for the table kernel once and cached when every weight input is a constant
// initializer (else packed on every call); the work is spread with ORT's intra-op thread pool
// (KernelContext_ParallelFor), so the session's intra_op_num_threads governs it.
#include "binary_mixed_linear/ort_op.h"

#include <exception>
#include <mutex>
#include <string>
#include <vector>

#include "binary_mixed_linear/bml_cpu.h"
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
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT16: return "uint16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT16: return "int16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT32: return "uint32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: return "int32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT64: return "uint64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return "int64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL: return "bool";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_STRING: return "string";
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
  return std::string(kDomain) + "::" + kOpBinaryMixedLinear +
         (node_name.empty() ? std::string() : " node '" + node_name + "'") + ": ";
}

// Takes ownership of an OrtStatus from an API call; returns its message (empty if ok).
std::string TakeError(const OrtApi& api, OrtStatus* status) {
  if (!status) return std::string();
  std::string msg = api.GetErrorMessage(status);
  api.ReleaseStatus(status);
  return msg.empty() ? std::string("unknown ONNX Runtime error") : msg;
}

// ParallelFor callback of the launcher over the kernel context's thread pool.
struct OrtPool {
  const OrtApi* api;
  OrtKernelContext* ctx;
};

void OrtParallelFor(void* pool, void (*task)(void*, size_t), size_t total, void* data) {
  OrtPool* p = static_cast<OrtPool*>(pool);
  OrtStatus* status = p->api->KernelContext_ParallelFor(p->ctx, task, total, 0, data);
  if (status) {
    // No pool to run on: run serially (tasks write disjoint outputs and may be rerun).
    p->api->ReleaseStatus(status);
    for (size_t i = 0; i < total; ++i) task(data, i);
  }
}

struct BmlKernel {
  BmlKernel(const OrtApi& api, bml::Attributes attrs, std::string node_name,
            ONNXTensorElementDataType act, bml::Isa isa, std::vector<bool> constant)
      : api_(api), attrs_(attrs), node_name_(std::move(node_name)), act_(act), isa_(isa),
        constant_(std::move(constant)) {}

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
  // Returns an error message, empty on success.
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
      if (!value) continue;  // omitted optional input
      if (!(err = Describe(value, i, &in[i])).empty()) return err;
    }

    bml::Args args;
    Status st = bml::ValidateInputs(attrs_, in, &args);
    if (!st) return st.message;
    if (ToDType(act_) != in[kInX].dtype)
      return "input 'X' (#0) is " + TypeName(act_) + " for this kernel but " +
             in[kInX].dtype_name + " at run time";

    std::vector<int64_t> out_shape = in[kInX].shape;
    out_shape.back() = attrs_.out_features;
    OrtValue* out = nullptr;
    if (!(err = TakeError(api_, api_.KernelContext_GetOutput(ctx, 0, out_shape.data(),
                                                            out_shape.size(), &out))).empty())
      return err;
    void* y = nullptr;
    if (!(err = TakeError(api_, api_.GetTensorMutableData(out, &y))).empty()) return err;
    args.y = y;
    if (args.m == 0 || args.n == 0) return std::string();
    bml::PackedPtr packed;
    if (!(err = Packed(in, args, &packed)).empty()) return err;
    OrtPool pool{&api_, ctx};
    bml::ParallelFor par;
    par.run = &OrtParallelFor;
    par.pool = &pool;
    st = bml::RunCpuPacked(args, *packed, isa_, par);
    return st ? std::string() : st.message;
  }

  // The packed weights: cached when every present weight input is a constant initializer
  // (keyed on their data pointers, which stay put for the session's life), else built now.
  std::string Packed(const std::vector<bml::TensorView>& in, const bml::Args& args,
                     bml::PackedPtr* out) {
    bool cacheable = true;
    std::vector<const void*> key;
    for (int i = 1; i < kNumInputs; ++i) {
      key.push_back(in[i].present ? in[i].data : nullptr);
      if (in[i].present && !constant_[i]) cacheable = false;
    }
    if (cacheable) {
      std::lock_guard<std::mutex> lock(cache_mutex_);
      if (cache_ && cache_key_ == key) {
        *out = cache_;
        return std::string();
      }
    }
    Status st = bml::PackWeights(args, out);
    if (!st) return st.message;
    if (cacheable) {
      std::lock_guard<std::mutex> lock(cache_mutex_);
      cache_ = *out;
      cache_key_ = key;
    }
    return std::string();
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
  bml::Isa isa_;
  std::vector<bool> constant_;  // per input: a constant initializer
  std::mutex cache_mutex_;
  bml::PackedPtr cache_;
  std::vector<const void*> cache_key_;
};

struct BmlOp : Ort::CustomOpBase<BmlOp, BmlKernel, /*WithStatus=*/true> {
  explicit BmlOp(ONNXTensorElementDataType act) : act_(act) {}

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
      bml::Isa isa;
      st = bml::IsaFromEnvironment(&isa);
      if (!st)
        return api.CreateStatus(ORT_INVALID_ARGUMENT, (Prefix(node_name) + st.message).c_str());
      std::vector<bool> constant(kNumInputs, false);
      size_t input_count = 0;
      if (TakeError(api, api.KernelInfo_GetInputCount(info, &input_count)).empty()) {
        for (size_t i = 1; i < input_count && i < constant.size(); ++i) {
          int is_constant = 0;
          const OrtValue* value = nullptr;
          if (TakeError(api, api.KernelInfoGetConstantInput_tensor(info, i, &is_constant, &value))
                  .empty())
            constant[i] = is_constant != 0 && value != nullptr;
        }
      }
      *op_kernel = new BmlKernel(api, attrs, node_name, act_, isa, std::move(constant));
      return nullptr;
    } catch (const std::exception& e) {
      return api.CreateStatus(ORT_FAIL, (Prefix(node_name) + e.what()).c_str());
    } catch (...) {
      return api.CreateStatus(ORT_FAIL, (Prefix(node_name) + "unknown error").c_str());
    }
  }

  const char* GetName() const { return kOpBinaryMixedLinear; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }

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

void AddBinaryMixedLinearOps(Ort::CustomOpDomain& domain) {
  // The op objects must outlive every session that uses them: static storage.
  static BmlOp op_float(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
  static BmlOp op_half(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16);
  domain.Add(&op_float);
  domain.Add(&op_half);
}

}  // namespace qexport
