// TensorView helpers (qexport_tensor.h).
#include "qexport_tensor.h"

#include <sstream>

namespace qexport {

const char* DTypeName(DType t) {
  switch (t) {
    case DType::kFloat32: return "float";
    case DType::kFloat16: return "float16";
    case DType::kUint8: return "uint8";
    case DType::kInt32: return "int32";
    default: return "other";
  }
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  std::ostringstream os;
  os << '[';
  for (size_t i = 0; i < shape.size(); ++i) {
    os << (i ? ", " : "");
    if (shape[i] < 0) {
      os << '?';
    } else {
      os << shape[i];
    }
  }
  os << ']';
  return os.str();
}

std::string Describe(const TensorView& t) {
  const std::string name = t.dtype == DType::kOther && !t.dtype_name.empty()
                               ? t.dtype_name : std::string(DTypeName(t.dtype));
  return name + " " + ShapeString(t.shape);
}

}  // namespace qexport
