// ONNX Runtime glue every op shares (qexport_ort.h).
#include "qexport_ort.h"

namespace qexport {
namespace ort {
namespace {

std::string Describe(const OrtApi& api, const OrtValue* value, int index,
                     const char* (*input_name)(int), TensorView* t) {
  std::string err;
  int is_tensor = 0;
  if (!(err = TakeError(api, api.IsTensor(value, &is_tensor))).empty()) return err;
  if (!is_tensor)
    return std::string("input '") + input_name(index) + "' (#" + std::to_string(index) +
           ") is not a tensor";
  OrtTensorTypeAndShapeInfo* info = nullptr;
  if (!(err = TakeError(api, api.GetTensorTypeAndShape(value, &info))).empty()) return err;
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  size_t rank = 0;
  err = TakeError(api, api.GetTensorElementType(info, &type));
  if (err.empty()) err = TakeError(api, api.GetDimensionsCount(info, &rank));
  if (err.empty()) {
    t->shape.assign(rank, 0);
    err = TakeError(api, api.GetDimensions(info, t->shape.data(), rank));
  }
  api.ReleaseTensorTypeAndShapeInfo(info);
  if (!err.empty()) return err;
  const void* data = nullptr;
  if (!(err = TakeError(api, api.GetTensorData(value, &data))).empty()) return err;
  t->present = true;
  t->dtype = ToDType(type);
  t->dtype_name = TypeName(type);
  t->data = data;
  return std::string();
}

}  // namespace

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

DType ToDType(ONNXTensorElementDataType t) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return DType::kFloat32;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return DType::kFloat16;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8: return DType::kUint8;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: return DType::kInt32;
    default: return DType::kOther;
  }
}

std::string TakeError(const OrtApi& api, OrtStatus* status) {
  if (!status) return std::string();
  std::string msg = api.GetErrorMessage(status);
  api.ReleaseStatus(status);
  return msg.empty() ? std::string("unknown ONNX Runtime error") : msg;
}

std::string NodeName(const OrtApi& api, const OrtKernelInfo* info) {
  size_t size = 0;
  if (TakeError(api, api.KernelInfo_GetNodeName(info, nullptr, &size)).empty() && size > 1) {
    std::vector<char> buf(size);
    if (TakeError(api, api.KernelInfo_GetNodeName(info, buf.data(), &size)).empty())
      return std::string(buf.data());
  }
  return std::string();
}

std::string ReadIntAttributes(const OrtApi& api, const OrtKernelInfo* info,
                              std::initializer_list<IntAttribute> attributes) {
  for (const IntAttribute& a : attributes) {
    std::string err = TakeError(api, api.KernelInfoGetAttribute_int64(info, a.name, a.value));
    if (!err.empty())
      return std::string("missing or non-int attribute '") + a.name + "' (" + err + ")";
  }
  return std::string();
}

std::string GatherInputs(const OrtApi& api, OrtKernelContext* ctx, size_t slots,
                         const char* (*input_name)(int), std::vector<TensorView>* in) {
  std::string err;
  size_t count = 0;
  if (!(err = TakeError(api, api.KernelContext_GetInputCount(ctx, &count))).empty()) return err;
  // Reset in place: a vector reused across calls keeps its shapes' storage (no allocation).
  in->resize(slots);
  for (TensorView& t : *in) {
    t.present = false;
    t.dtype = DType::kOther;
    t.dtype_name.clear();
    t.shape.clear();
    t.data = nullptr;
  }
  for (size_t i = 0; i < slots && i < count; ++i) {
    const OrtValue* value = nullptr;
    if (!(err = TakeError(api, api.KernelContext_GetInput(ctx, i, &value))).empty()) return err;
    if (!value) continue;  // omitted optional input
    if (!(err = Describe(api, value, static_cast<int>(i), input_name, &(*in)[i])).empty())
      return err;
  }
  return std::string();
}

std::vector<bool> ConstantInputs(const OrtApi& api, const OrtKernelInfo* info, size_t slots) {
  std::vector<bool> constant(slots, false);
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
  return constant;
}

void OrtThreadPool::Run(void* pool, void (*task)(void*, size_t), size_t total, void* data) {
  OrtThreadPool* p = static_cast<OrtThreadPool*>(pool);
  OrtStatus* status = p->api_->KernelContext_ParallelFor(p->ctx_, task, total, 0, data);
  if (status) {
    // No pool to run on: run serially (tasks write disjoint outputs and may be rerun).
    p->api_->ReleaseStatus(status);
    for (size_t i = 0; i < total; ++i) task(data, i);
  }
}

}  // namespace ort
}  // namespace qexport
