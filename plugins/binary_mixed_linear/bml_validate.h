// Validation of qexport::BinaryMixedLinear inputs and attributes against docs/format.md
// ("Kernels must reject..."). No ONNX Runtime types: the glue describes each input as a
// TensorView. Messages are one line, name the input and state the shapes; the glue prefixes
// the op and node name.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "binary_mixed_linear/bml_cpu.h"
#include "qexport_contract.h"

namespace qexport {
namespace bml {

enum class DType { kFloat32, kFloat16, kUint8, kInt32, kOther };

struct TensorView {
  bool present = false;
  DType dtype = DType::kOther;
  std::string dtype_name;  // as the runtime calls it, for messages (e.g. "int64")
  std::vector<int64_t> shape;
  const void* data = nullptr;
};

struct Attributes {
  int64_t in_features = 0;
  int64_t out_features = 0;
  int64_t salient_group_size = 0;
  int64_t layout = 0;
};

// Names of the inputs in contract order ("X", "sign_packed", ...).
const char* InputName(int index);
std::string ShapeString(const std::vector<int64_t>& shape);

// Attribute values alone (checked once, at kernel creation).
Status ValidateAttributes(const Attributes& attrs);

// All inputs against the attributes: presence, dtype, shape, salient_idx order and range,
// zero points <= 15. On success fills every field of *args (sizes, pointers, act type)
// except y. check_contents = false skips the value checks (salient_idx, zero points): for
// constant weights whose contents were checked on an earlier call (the CPU glue's cache).
Status ValidateInputs(const Attributes& attrs, const std::vector<TensorView>& inputs,
                      Args* args, bool check_contents = true);

}  // namespace bml
}  // namespace qexport
