// ONNX Runtime glue shared by the CPU (ort_op.cpp) and CUDA (ort_cuda_op.cpp) variants of
// qexport::BinaryMixedLinear: the op schema, the node's attributes read and checked once at
// kernel creation, the inputs gathered into TensorView form for the shared validator
// (bml_validate.h), the output allocation. The op-independent parts (OrtStatus handling, the
// noexcept Guard, input description) are plugins/common/qexport_ort.h.
//
// Errors are returned as a message (empty on success), unprefixed: Guard adds the prefix.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "binary_mixed_linear/bml_contract.h"
#include "binary_mixed_linear/bml_validate.h"
#include "onnxruntime_cxx_api.h"
#include "qexport_ort.h"
#include "qexport_tensor.h"

namespace qexport {
namespace bml {
namespace ort {

using ::qexport::ort::Guard;
using ::qexport::ort::TakeError;
using ::qexport::ort::ToDType;
using ::qexport::ort::TypeName;

// What a kernel knows about its node, read once at kernel creation (ReadNode).
struct Node {
  ONNXTensorElementDataType act = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;  // X and Y type
  const char* ep_tag = "";  // after the op name in messages: "" (CPU), " (CUDA)"
  std::string name;         // the node's name, may be empty
  Attributes attrs;

  // "qexport::BinaryMixedLinear<ep_tag> node '<name>': " (no node part when unnamed).
  std::string Prefix() const;
};

// Reads the node name (best effort) and the int attributes into *node, then checks them with
// bml::ValidateAttributes. node->act and node->ep_tag are left as the caller set them.
std::string ReadNode(const OrtApi& api, const OrtKernelInfo* info, Node* node);

// Describes every present input of the call (omitted optional ones stay !present).
std::string GatherInputs(const OrtApi& api, OrtKernelContext* ctx, std::vector<TensorView>* in);

// bml::ValidateInputs, then X's runtime dtype against the kernel's activation type.
// check_contents: as in bml::ValidateInputs.
std::string ValidateInputs(const Node& node, const std::vector<TensorView>& in, Args* args,
                           bool check_contents = true);

// Allocates Y (X's shape with the last dimension out_features) and returns its data pointer.
std::string AllocateOutput(const OrtApi& api, OrtKernelContext* ctx, const Node& node,
                           const TensorView& x, void** y);

// Base of the kernels: the API table, the node, and ComputeV2, which gathers the inputs and
// calls Kernel::Compute(OrtKernelContext*, const std::vector<TensorView>&) -> error
// message (empty on success) under Guard.
template <typename Kernel>
struct KernelBase {
  KernelBase(const OrtApi& api, Node node) : api_(api), node_(std::move(node)) {}

  OrtStatusPtr ComputeV2(OrtKernelContext* ctx) noexcept {
    return Guard(api_, node_, [&] {
      // Reused by this thread's calls (GatherInputs resets it without freeing its storage).
      thread_local std::vector<TensorView> in;
      std::string err = GatherInputs(api_, ctx, &in);
      if (!err.empty()) return err;
      return static_cast<Kernel*>(this)->Compute(ctx, in);
    });
  }

 protected:
  const OrtApi& api_;
  Node node_;
};

// The op both variants share: name, schema (X typed, weights with an undefined element type so
// that the validator names a wrong dtype; R2 and bias optional; one output of X's type) and
// CreateKernelV2, which reads and checks the node (ReadNode) and then calls
//   static std::string Op::MakeKernel(const OrtApi&, const OrtKernelInfo*, const Node&,
//                                     Kernel** kernel)   // error message, empty on success
// for the variant's own part.
template <typename Op, typename Kernel>
struct OpBase : Ort::CustomOpBase<Op, Kernel, /*WithStatus=*/true> {
  // ep_type: GetExecutionProviderType(); ep_tag: Node::ep_tag.
  OpBase(ONNXTensorElementDataType act, const char* ep_type, const char* ep_tag)
      : act_(act), ep_type_(ep_type), ep_tag_(ep_tag) {}

  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info,
                              void** op_kernel) const noexcept {
    *op_kernel = nullptr;
    Node node;
    node.act = act_;
    node.ep_tag = ep_tag_;
    return Guard(api, node, [&] {
      std::string err = ReadNode(api, info, &node);
      if (!err.empty()) return err;
      Kernel* kernel = nullptr;
      if (!(err = Op::MakeKernel(api, info, static_cast<const Node&>(node), &kernel)).empty())
        return err;
      *op_kernel = kernel;
      return std::string();
    });
  }

  const char* GetName() const { return kOpName; }
  const char* GetExecutionProviderType() const { return ep_type_; }

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
  const char* ep_type_;
  const char* ep_tag_;
};

// Adds the float and float16 variants of Op to `domain`. The op objects must outlive every
// session that uses them: static storage (one pair per Op).
template <typename Op>
void AddOps(Ort::CustomOpDomain& domain) {
  static Op op_float(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
  static Op op_half(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16);
  domain.Add(&op_float);
  domain.Add(&op_half);
}

}  // namespace ort
}  // namespace bml
}  // namespace qexport
