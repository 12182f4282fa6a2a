// ONNX Runtime glue shared by the CPU and CUDA variants of qexport::BinaryMixedLinear
// (ort_common.h).
#include "binary_mixed_linear/ort_common.h"

namespace qexport {
namespace bml_ort {
namespace {

std::string Describe(const OrtApi& api, const OrtValue* value, int index, bml::TensorView* t) {
  std::string err;
  int is_tensor = 0;
  if (!(err = TakeError(api, api.IsTensor(value, &is_tensor))).empty()) return err;
  if (!is_tensor)
    return std::string("input '") + bml::InputName(index) + "' (#" + std::to_string(index) +
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

bml::DType ToDType(ONNXTensorElementDataType t) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return bml::DType::kFloat32;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return bml::DType::kFloat16;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8: return bml::DType::kUint8;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: return bml::DType::kInt32;
    default: return bml::DType::kOther;
  }
}

std::string TakeError(const OrtApi& api, OrtStatus* status) {
  if (!status) return std::string();
  std::string msg = api.GetErrorMessage(status);
  api.ReleaseStatus(status);
  return msg.empty() ? std::string("unknown ONNX Runtime error") : msg;
}

std::string Node::Prefix() const {
  return std::string(kDomain) + "::" + kOpBinaryMixedLinear + ep_tag +
         (name.empty() ? std::string() : " node '" + name + "'") + ": ";
}

std::string ReadNode(const OrtApi& api, const OrtKernelInfo* info, Node* node) {
  size_t size = 0;
  if (TakeError(api, api.KernelInfo_GetNodeName(info, nullptr, &size)).empty() && size > 1) {
    std::vector<char> buf(size);
    if (TakeError(api, api.KernelInfo_GetNodeName(info, buf.data(), &size)).empty())
      node->name.assign(buf.data());
  }
  bml::Attributes& attrs = node->attrs;
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
      return std::string("missing or non-int attribute '") + f.name + "' (" + err + ")";
  }
  Status st = bml::ValidateAttributes(attrs);
  return st ? std::string() : st.message;
}

std::string GatherInputs(const OrtApi& api, OrtKernelContext* ctx,
                         std::vector<bml::TensorView>* in) {
  std::string err;
  size_t count = 0;
  if (!(err = TakeError(api, api.KernelContext_GetInputCount(ctx, &count))).empty()) return err;
  // Reset in place: a vector reused across calls keeps its shapes' storage (no allocation).
  in->resize(kNumInputs);
  for (bml::TensorView& t : *in) {
    t.present = false;
    t.dtype = bml::DType::kOther;
    t.dtype_name.clear();
    t.shape.clear();
    t.data = nullptr;
  }
  for (int i = 0; i < kNumInputs; ++i) {
    if (static_cast<size_t>(i) >= count) continue;
    const OrtValue* value = nullptr;
    if (!(err = TakeError(api, api.KernelContext_GetInput(ctx, i, &value))).empty()) return err;
    if (!value) continue;  // omitted optional input
    if (!(err = Describe(api, value, i, &(*in)[i])).empty()) return err;
  }
  return std::string();
}

std::string ValidateInputs(const Node& node, const std::vector<bml::TensorView>& in,
                           bml::Args* args, bool check_contents) {
  Status st = bml::ValidateInputs(node.attrs, in, args, check_contents);
  if (!st) return st.message;
  if (ToDType(node.act) != in[kInX].dtype)
    return "input 'X' (#0) is " + TypeName(node.act) + " for this kernel but " +
           in[kInX].dtype_name + " at run time";
  return std::string();
}

std::string AllocateOutput(const OrtApi& api, OrtKernelContext* ctx, const Node& node,
                           const bml::TensorView& x, void** y) {
  std::vector<int64_t> out_shape = x.shape;
  out_shape.back() = node.attrs.out_features;
  std::string err;
  OrtValue* out = nullptr;
  if (!(err = TakeError(api, api.KernelContext_GetOutput(ctx, 0, out_shape.data(),
                                                         out_shape.size(), &out))).empty())
    return err;
  return TakeError(api, api.GetTensorMutableData(out, y));
}

}  // namespace bml_ort
}  // namespace qexport
