// Input and attribute checks of qexport::BinaryMixedLinear (docs/format.md).
#include "binary_mixed_linear/bml_validate.h"

#include <algorithm>
#include <initializer_list>
#include <string>

namespace qexport {
namespace bml {

namespace {

static_assert(kNumInputs == 10, "update kInputNames and kInputDTypes with the contract");
const char* const kInputNames[kNumInputs] = {
    "X", "sign_packed", "row_scale", "row_offset", "salient_idx",
    "salient_packed", "salient_scale", "salient_zero", "r2", "bias"};
// The element type of each input; X (kOther here) is float or float16.
constexpr DType kInputDTypes[kNumInputs] = {
    DType::kOther, DType::kUint8,   DType::kFloat16, DType::kFloat16, DType::kInt32,
    DType::kUint8, DType::kFloat16, DType::kUint8,   DType::kFloat16, DType::kFloat32};

std::string Label(int i) {
  return std::string("input '") + InputName(i) + "' (#" + std::to_string(i) + ")";
}

// A size for messages: "?" when unknown (< 0).
std::string Size(int64_t v) { return v < 0 ? std::string("?") : std::to_string(v); }

// ceil(a / b) (b > 0); -1 for an unknown a. No a + b - 1: attributes may be near INT64_MAX.
int64_t CeilDiv(int64_t a, int64_t b) { return a < 0 ? -1 : a / b + (a % b != 0); }

// Whether `shape` has the rank of `want` and equal dims wherever both are known (>= 0).
bool DimsMatch(const std::vector<int64_t>& shape, std::initializer_list<int64_t> want) {
  return shape.size() == want.size() &&
         std::equal(want.begin(), want.end(), shape.begin(),
                    [](int64_t w, int64_t d) { return w < 0 || d < 0 || w == d; });
}

// Input i has its contract dtype and the shape `shape`. why() -> std::string is only called
// to build an error message (this runs on every call: nothing is allocated on success).
template <typename Why>
Status Expect(const std::vector<TensorView>& in, int i, std::initializer_list<int64_t> shape,
              Why why) {
  const TensorView& t = in[i];
  const DType dtype = kInputDTypes[i];
  if (t.dtype != dtype || !DimsMatch(t.shape, shape)) {
    return Status::Error(Label(i) + " is " + Describe(t) + ", expected " + DTypeName(dtype) +
                         " " + ShapeString(std::vector<int64_t>(shape)) + " (" + why() + ")");
  }
  return Status::Ok();
}

// X: float or float16, [..., K]; salient_idx: int32 [S] with S <= K. Sets *s (-1: unknown).
Status ExpectXAndSalientIdx(const std::vector<TensorView>& in, int64_t k, int64_t* s) {
  const TensorView& x = in[kInX];
  if (x.dtype != DType::kFloat32 && x.dtype != DType::kFloat16)
    return Status::Error(Label(kInX) + " is " + Describe(x) + ", expected float or float16");
  if (x.shape.empty() || (x.shape.back() >= 0 && x.shape.back() != k))
    return Status::Error(Label(kInX) + " is " + Describe(x) + ", expected shape [..., " +
                         std::to_string(k) + "] (in_features=" + std::to_string(k) + ")");
  const TensorView& idx = in[kInSalientIdx];
  if (idx.dtype != DType::kInt32 || idx.shape.size() != 1)
    return Status::Error(Label(kInSalientIdx) + " is " + Describe(idx) +
                         ", expected int32 [S] (a 1-D list of salient channels)");
  *s = idx.shape[0] < 0 ? -1 : idx.shape[0];
  if (*s > k)
    return Status::Error(Label(kInSalientIdx) + " is " + Describe(idx) + ", more channels than "
                         "in_features=" + std::to_string(k));
  return Status::Ok();
}

// salient_idx strictly increasing within [0, K); zero points <= 15.
Status ExpectContents(const Attributes& attrs, const std::vector<TensorView>& in, int64_t s) {
  const int64_t k = attrs.in_features, n = attrs.out_features;
  const int64_t groups = NumGroups(s, attrs.salient_group_size);
  const int32_t* sidx = static_cast<const int32_t*>(in[kInSalientIdx].data);
  const uint8_t* zero = static_cast<const uint8_t*>(in[kInSalientZero].data);
  for (int64_t j = 0; j < s; ++j) {
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
  for (int64_t i = 0; i < n * groups; ++i) {
    if (zero[i] > kSalientQmax)
      return Status::Error(Label(kInSalientZero) + " " + ShapeString({n, groups}) + ": value " +
                           std::to_string(zero[i]) + " at [" + std::to_string(i / groups) + ", " +
                           std::to_string(i % groups) + "] is above " +
                           std::to_string(kSalientQmax));
  }
  return Status::Ok();
}

void FillArgs(const Attributes& attrs, const std::vector<TensorView>& in, int64_t s,
              Args* args) {
  const TensorView& x = in[kInX];
  int64_t m = 1;
  for (size_t d = 0; d + 1 < x.shape.size(); ++d) m *= x.shape[d];
  args->m = m;
  args->k = attrs.in_features;
  args->n = attrs.out_features;
  args->s = s;
  args->group_size = attrs.salient_group_size;
  args->act = x.dtype == DType::kFloat32 ? ActType::kFloat32 : ActType::kFloat16;
  args->x = x.data;
  args->sign_packed = static_cast<const uint8_t*>(in[kInSignPacked].data);
  args->row_scale = static_cast<const uint16_t*>(in[kInRowScale].data);
  args->row_offset = static_cast<const uint16_t*>(in[kInRowOffset].data);
  args->salient_idx = static_cast<const int32_t*>(in[kInSalientIdx].data);
  args->salient_packed = static_cast<const uint8_t*>(in[kInSalientPacked].data);
  args->salient_scale = static_cast<const uint16_t*>(in[kInSalientScale].data);
  args->salient_zero = static_cast<const uint8_t*>(in[kInSalientZero].data);
  args->r2 = in[kInR2].present ? static_cast<const uint16_t*>(in[kInR2].data) : nullptr;
  args->bias = in[kInBias].present ? static_cast<const float*>(in[kInBias].data) : nullptr;
}

}  // namespace

const char* InputName(int index) {
  return index >= 0 && index < kNumInputs ? kInputNames[index] : "?";
}

bool InputDTypeOk(int index, DType dtype) {
  if (index == kInX) return dtype == DType::kFloat32 || dtype == DType::kFloat16;
  return index > 0 && index < kNumInputs && dtype == kInputDTypes[index];
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

Status ValidateShapes(const Attributes& attrs, const std::vector<TensorView>& in,
                      int64_t* salient_channels) {
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
  int64_t s = -1;
  if (!(st = ExpectXAndSalientIdx(in, k, &s))) return st;
  // Sizes that depend on S: -1 (unknown) when S is.
  const int64_t kb = s < 0 ? -1 : k - s;
  const int64_t groups = s < 0 ? -1 : NumGroups(s, attrs.salient_group_size);
  auto nk = [&] { return "out_features=" + std::to_string(n); };
  auto ks = [&] { return "in_features=" + std::to_string(k) + ", S=" + Size(s); };
  auto gs = [&] {
    return nk() + ", groups=" + Size(groups) + " for S=" + Size(s) +
           " and salient_group_size=" + std::to_string(attrs.salient_group_size);
  };

  if (!(st = Expect(in, kInSignPacked, {n, CeilDiv(kb, 8)}, [&] {
          return nk() + ", ceil((" + ks() + " binary columns = " + Size(kb) + ") / 8)";
        })))
    return st;
  if (!(st = Expect(in, kInRowScale, {n}, nk))) return st;
  if (!(st = Expect(in, kInRowOffset, {n}, nk))) return st;
  if (!(st = Expect(in, kInSalientPacked, {n, CeilDiv(s, 2)},
                    [&] { return nk() + ", ceil(S=" + Size(s) + " / 2)"; })))
    return st;
  if (!(st = Expect(in, kInSalientScale, {n, groups}, gs))) return st;
  if (!(st = Expect(in, kInSalientZero, {n, groups}, gs))) return st;
  if (in[kInR2].present &&
      !(st = Expect(in, kInR2, {kb}, [&] { return "binary columns: " + ks(); })))
    return st;
  if (in[kInBias].present && !(st = Expect(in, kInBias, {n}, nk))) return st;
  if (salient_channels) *salient_channels = s;
  return Status::Ok();
}

Status ValidateInputs(const Attributes& attrs, const std::vector<TensorView>& in, Args* args,
                      bool check_contents) {
  int64_t s = -1;
  Status st = ValidateShapes(attrs, in, &s);
  if (!st) return st;
  if (s < 0)  // a runtime with data has every dim
    return Status::Error(Label(kInSalientIdx) + " has an unknown length");
  if (check_contents && !(st = ExpectContents(attrs, in, s))) return st;
  FillArgs(attrs, in, s, args);
  return Status::Ok();
}

}  // namespace bml
}  // namespace qexport
