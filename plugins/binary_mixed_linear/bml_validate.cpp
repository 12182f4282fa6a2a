// Input and attribute checks of qexport::BinaryMixedLinear (docs/format.md).
#include "binary_mixed_linear/bml_validate.h"

#include <algorithm>
#include <initializer_list>
#include <sstream>

namespace qexport {
namespace bml {

namespace {

static_assert(kNumInputs == 10, "update kInputNames with the contract");
const char* const kInputNames[kNumInputs] = {
    "X", "sign_packed", "row_scale", "row_offset", "salient_idx",
    "salient_packed", "salient_scale", "salient_zero", "r2", "bias"};

const char* DTypeName(DType t) {
  switch (t) {
    case DType::kFloat32: return "float";
    case DType::kFloat16: return "float16";
    case DType::kUint8: return "uint8";
    case DType::kInt32: return "int32";
    default: return "other";
  }
}

std::string Describe(const TensorView& t) {
  const std::string name = t.dtype == DType::kOther && !t.dtype_name.empty()
                               ? t.dtype_name : std::string(DTypeName(t.dtype));
  return name + " " + ShapeString(t.shape);
}

std::string Label(int i) {
  return std::string("input '") + InputName(i) + "' (#" + std::to_string(i) + ")";
}

// why() -> std::string is only called to build an error message (this runs on every call:
// nothing is allocated on success).
template <typename Why>
Status Expect(const std::vector<TensorView>& in, int i, DType dtype,
              std::initializer_list<int64_t> shape, Why why) {
  const TensorView& t = in[i];
  if (t.dtype != dtype || t.shape.size() != shape.size() ||
      !std::equal(shape.begin(), shape.end(), t.shape.begin())) {
    return Status::Error(Label(i) + " is " + Describe(t) + ", expected " + DTypeName(dtype) +
                         " " + ShapeString(std::vector<int64_t>(shape)) + " (" + why() + ")");
  }
  return Status::Ok();
}

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

const char* InputName(int index) {
  return index >= 0 && index < kNumInputs ? kInputNames[index] : "?";
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  std::ostringstream os;
  os << '[';
  for (size_t i = 0; i < shape.size(); ++i) os << (i ? ", " : "") << shape[i];
  os << ']';
  return os.str();
}

Status ValidateAttributes(const Attributes& a) {
  if (a.layout != kLayoutRowMajor)
    return Status::Error("attribute '" + std::string(kAttrLayout) + "' = " +
                         std::to_string(a.layout) + " is an unknown packed layout; supported: " +
                         std::to_string(kLayoutRowMajor));
  if (a.in_features < 1)
    return Status::Error("attribute '" + std::string(kAttrInFeatures) + "' = " +
                         std::to_string(a.in_features) + " must be >= 1");
  if (a.out_features < 1)
    return Status::Error("attribute '" + std::string(kAttrOutFeatures) + "' = " +
                         std::to_string(a.out_features) + " must be >= 1");
  if (a.salient_group_size < 0)
    return Status::Error("attribute '" + std::string(kAttrSalientGroupSize) + "' = " +
                         std::to_string(a.salient_group_size) + " must be >= 0");
  return Status::Ok();
}

Status ValidateInputs(const Attributes& attrs, const std::vector<TensorView>& in, Args* args,
                      bool check_contents) {
  Status st = ValidateAttributes(attrs);
  if (!st) return st;
  if (in.size() != static_cast<size_t>(kNumInputs))
    return Status::Error("expected " + std::to_string(kNumInputs) + " input slots, got " +
                         std::to_string(in.size()));
  for (int i = 0; i < kNumInputs; ++i) {
    if (!in[i].present && i != kInR2 && i != kInBias)
      return Status::Error(Label(i) + " is missing; it is required");
  }
  const int64_t k = attrs.in_features, n = attrs.out_features;
  auto nk = [&] { return "out_features=" + std::to_string(n); };

  // X: float or float16, [..., K]
  const TensorView& x = in[kInX];
  if (x.dtype != DType::kFloat32 && x.dtype != DType::kFloat16)
    return Status::Error(Label(kInX) + " is " + Describe(x) + ", expected float or float16");
  if (x.shape.empty() || x.shape.back() != k)
    return Status::Error(Label(kInX) + " is " + Describe(x) + ", expected shape [..., " +
                         std::to_string(k) + "] (in_features=" + std::to_string(k) + ")");

  // salient_idx fixes S.
  const TensorView& idx = in[kInSalientIdx];
  if (idx.dtype != DType::kInt32 || idx.shape.size() != 1)
    return Status::Error(Label(kInSalientIdx) + " is " + Describe(idx) +
                         ", expected int32 [S] (a 1-D list of salient channels)");
  const int64_t s = idx.shape[0];
  if (s > k)
    return Status::Error(Label(kInSalientIdx) + " is " + Describe(idx) + ", more channels than "
                         "in_features=" + std::to_string(k));
  const int64_t kb = k - s;
  const int64_t groups = NumGroups(s, attrs.salient_group_size);
  auto ks = [&] { return "in_features=" + std::to_string(k) + ", S=" + std::to_string(s); };
  auto gs = [&] {
    return nk() + ", groups=" + std::to_string(groups) + " for S=" + std::to_string(s) +
           " and salient_group_size=" + std::to_string(attrs.salient_group_size);
  };

  if (!(st = Expect(in, kInSignPacked, DType::kUint8, {n, CeilDiv(kb, 8)},
                    [&] {
                      return nk() + ", ceil((" + ks() + " binary columns = " +
                             std::to_string(kb) + ") / 8)";
                    })))
    return st;
  if (!(st = Expect(in, kInRowScale, DType::kFloat16, {n}, nk))) return st;
  if (!(st = Expect(in, kInRowOffset, DType::kFloat16, {n}, nk))) return st;
  if (!(st = Expect(in, kInSalientPacked, DType::kUint8, {n, CeilDiv(s, 2)},
                    [&] { return nk() + ", ceil(S=" + std::to_string(s) + " / 2)"; })))
    return st;
  if (!(st = Expect(in, kInSalientScale, DType::kFloat16, {n, groups}, gs))) return st;
  if (!(st = Expect(in, kInSalientZero, DType::kUint8, {n, groups}, gs))) return st;
  if (in[kInR2].present &&
      !(st = Expect(in, kInR2, DType::kFloat16, {kb}, [&] { return "binary columns: " + ks(); })))
    return st;
  if (in[kInBias].present && !(st = Expect(in, kInBias, DType::kFloat32, {n}, nk))) return st;

  // Contents.
  const int32_t* sidx = static_cast<const int32_t*>(idx.data);
  const uint8_t* zero = static_cast<const uint8_t*>(in[kInSalientZero].data);
  for (int64_t j = 0; check_contents && j < s; ++j) {
    const int64_t c = sidx[j];
    if (c < 0 || c >= k)
      return Status::Error(Label(kInSalientIdx) + " [" + std::to_string(s) + "]: value " +
                           std::to_string(c) + " at position " + std::to_string(j) +
                           " is out of range [0, in_features=" + std::to_string(k) + ")");
    if (j > 0 && c <= sidx[j - 1])
      return Status::Error(Label(kInSalientIdx) + " [" + std::to_string(s) +
                           "]: not strictly increasing: " + std::to_string(sidx[j - 1]) +
                           " then " + std::to_string(c) + " at position " + std::to_string(j));
  }
  for (int64_t i = 0; check_contents && i < n * groups; ++i) {
    if (zero[i] > kSalientQmax)
      return Status::Error(Label(kInSalientZero) + " " + ShapeString({n, groups}) + ": value " +
                           std::to_string(zero[i]) + " at [" + std::to_string(i / groups) + ", " +
                           std::to_string(i % groups) + "] is above " +
                           std::to_string(kSalientQmax));
  }

  int64_t m = 1;
  for (size_t d = 0; d + 1 < x.shape.size(); ++d) m *= x.shape[d];
  args->m = m;
  args->k = k;
  args->n = n;
  args->s = s;
  args->group_size = attrs.salient_group_size;
  args->act = x.dtype == DType::kFloat32 ? ActType::kFloat32 : ActType::kFloat16;
  args->x = x.data;
  args->sign_packed = static_cast<const uint8_t*>(in[kInSignPacked].data);
  args->row_scale = static_cast<const uint16_t*>(in[kInRowScale].data);
  args->row_offset = static_cast<const uint16_t*>(in[kInRowOffset].data);
  args->salient_idx = sidx;
  args->salient_packed = static_cast<const uint8_t*>(in[kInSalientPacked].data);
  args->salient_scale = static_cast<const uint16_t*>(in[kInSalientScale].data);
  args->salient_zero = zero;
  args->r2 = in[kInR2].present ? static_cast<const uint16_t*>(in[kInR2].data) : nullptr;
  args->bias = in[kInBias].present ? static_cast<const float*>(in[kInBias].data) : nullptr;
  return Status::Ok();
}

}  // namespace bml
}  // namespace qexport
