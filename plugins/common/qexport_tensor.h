// A runtime-neutral description of an op input (element type, shape, data), filled in by the
// ONNX Runtime and TensorRT glue and read by the ops' validators, so that the rules and their
// messages exist once.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace qexport {

enum class DType { kFloat32, kFloat16, kUint8, kInt32, kOther };

struct TensorView {
  bool present = false;
  DType dtype = DType::kOther;
  std::string dtype_name;  // as the runtime calls it, for messages (e.g. "int64")
  // A dim < 0 is unknown (TensorRT at build time); ONNX Runtime's are always known.
  std::vector<int64_t> shape;
  const void* data = nullptr;
};

// "float", "float16", "uint8", "int32" ("other" for kOther).
const char* DTypeName(DType t);

// "[2, 3]"; an unknown dim (< 0) is "?".
std::string ShapeString(const std::vector<int64_t>& shape);

// "<dtype> <shape>": the runtime's own name for a dtype outside DType.
std::string Describe(const TensorView& t);

}  // namespace qexport
