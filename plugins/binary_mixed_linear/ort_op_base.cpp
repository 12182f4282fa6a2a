// ONNX Runtime glue shared by the CPU and CUDA variants of qexport::BinaryMixedLinear
// (ort_op_base.h).
#include "binary_mixed_linear/ort_op_base.h"

namespace qexport {
namespace bml {
namespace ort {

std::string Node::Prefix() const {
  return std::string(kDomain) + "::" + kOpName + ep_tag +
         (name.empty() ? std::string() : " node '" + name + "'") + ": ";
}

std::string ReadNode(const OrtApi& api, const OrtKernelInfo* info, Node* node) {
  node->name = ::qexport::ort::NodeName(api, info);
  Attributes& attrs = node->attrs;
  std::string err = ::qexport::ort::ReadIntAttributes(
      api, info,
      {{kAttrInFeatures, &attrs.in_features},
       {kAttrOutFeatures, &attrs.out_features},
       {kAttrSalientGroupSize, &attrs.salient_group_size},
       {kAttrLayout, &attrs.layout}});
  if (!err.empty()) return err;
  Status st = ValidateAttributes(attrs);
  return st ? std::string() : st.message;
}

std::string GatherInputs(const OrtApi& api, OrtKernelContext* ctx, std::vector<TensorView>* in) {
  return ::qexport::ort::GatherInputs(api, ctx, kNumInputs, &InputName, in);
}

std::string ValidateInputs(const Node& node, const std::vector<TensorView>& in, Args* args,
                           bool check_contents) {
  Status st = bml::ValidateInputs(node.attrs, in, args, check_contents);
  if (!st) return st.message;
  if (ToDType(node.act) != in[kInX].dtype)
    return "input 'X' (#0) is " + TypeName(node.act) + " for this kernel but " +
           in[kInX].dtype_name + " at run time";
  return std::string();
}

std::string AllocateOutput(const OrtApi& api, OrtKernelContext* ctx, const Node& node,
                           const TensorView& x, void** y) {
  std::vector<int64_t> out_shape = x.shape;
  out_shape.back() = node.attrs.out_features;
  std::string err;
  OrtValue* out = nullptr;
  if (!(err = TakeError(api, api.KernelContext_GetOutput(ctx, 0, out_shape.data(),
                                                         out_shape.size(), &out))).empty())
    return err;
  return TakeError(api, api.GetTensorMutableData(out, y));
}

}  // namespace ort
}  // namespace bml
}  // namespace qexport
