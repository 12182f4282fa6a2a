// Validation of qexport::BinaryMixedLinear inputs and attributes against docs/format.md
// ("Kernels must reject..."), shared by the ONNX Runtime glue (CPU and CUDA) and the TensorRT
// plugin: the rules and their messages exist here only. No runtime types: the glue describes
// each input as a TensorView (plugins/common/qexport_tensor.h). Messages are one line, name the
// input and state the shapes; the glue prefixes the op and node name.
#pragma once

#include <cstdint>
#include <vector>

#include "binary_mixed_linear/bml_contract.h"
#include "binary_mixed_linear/bml_cpu.h"
#include "qexport_status.h"
#include "qexport_tensor.h"

namespace qexport {
namespace bml {

struct Attributes {
  int64_t in_features = 0;
  int64_t out_features = 0;
  int64_t salient_group_size = 0;
  int64_t layout = 0;
};

// Names of the inputs in contract order ("X", "sign_packed", ...); "?" out of range.
const char* InputName(int index);

// Whether input `index` may have element type `dtype` (X: float or float16; every other input
// its one contract type), whatever the shapes: for runtimes that ask per input (TensorRT's
// supportsFormatCombination).
bool InputDTypeOk(int index, DType dtype);

// Attribute values alone (checked once, at kernel creation).
Status ValidateAttributes(const Attributes& attrs);

// Attributes, then the inputs' presence, dtypes and shapes against them (kNumInputs slots,
// optional ones may be !present; contents are not read). A dim < 0 is unknown (TensorRT at
// build time) and accepted; so are the dims that depend on an unknown S (the length of
// salient_idx). *salient_channels (when not null): S, or -1 when unknown.
Status ValidateShapes(const Attributes& attrs, const std::vector<TensorView>& inputs,
                      int64_t* salient_channels = nullptr);

// ValidateShapes (every dim known), then salient_idx order and range and zero points <= 15.
// On success fills every field of *args (sizes, pointers, act type) except y.
// check_contents = false skips the value checks (salient_idx, zero points): for constant
// weights whose contents were checked on an earlier call (the CPU glue's cache).
Status ValidateInputs(const Attributes& attrs, const std::vector<TensorView>& inputs,
                      Args* args, bool check_contents = true);

}  // namespace bml
}  // namespace qexport
