// TensorRT IPluginV3 of qexport::BinaryMixedLinear (trt_plugin.h, docs/gpu.md).
//
// Inputs are the op's inputs in contract order; the weights arrive as plugin inputs (the ONNX
// parser turns initializers into constant layers). The optional inputs: TensorRT passes only
// the inputs that exist, so 8 inputs = no r2 and no bias, 10 = both, 9 = r2 when input 8 is
// half, bias when it is float. The output has X's type (float or half, linear format).
//
// Value checks: TensorRT gives a plugin no access to constant values at build time and
// enqueue must not synchronize, so salient_idx / salient_zero contents are not validated here
// (they are by the exporter, and by the ORT op). The kernels clamp every index they read with,
// so a bad value gives wrong numbers, never an out-of-bounds access. Shapes and types are
// checked at build time (configurePlugin) and on every shape change, by the shared validator
// (bml::ValidateShapes, bml_validate.h) on the inputs mapped to their contract slots; the
// TensorRT parts are here: the 8/9/10-input mapping (ContractIndex) and TensorRT types
// (kINT8 taken as a byte type, plugins/common/qexport_trt.h).
#include "binary_mixed_linear/trt_plugin.h"

#include <cstring>
#include <exception>
#include <new>

#include "binary_mixed_linear/bml_contract.h"
#include "binary_mixed_linear/bml_cuda.cuh"
#include "qexport_contract.h"
#include "qexport_tensor.h"
#include "qexport_trt.h"

namespace qexport {
namespace bml {
namespace trt {

using nvinfer1::DataType;
using nvinfer1::PluginField;
using nvinfer1::PluginFieldType;
using nvinfer1::TensorFormat;
using ::qexport::trt::TypeName;

namespace {

const char* const kFieldNames[4] = {kAttrInFeatures, kAttrOutFeatures, kAttrSalientGroupSize,
                                    kAttrLayout};

// Logs through the TensorRT logger, prefixed with the op.
void LogError(const std::string& msg) noexcept {
  try {
    ::qexport::trt::LogError(std::string(kDomain) + "::" + kOpName + " (TensorRT plugin): " +
                             msg);
  } catch (...) {
  }
}

// Whether TensorRT input `pos` of `nb_inputs` may have type t (input 8 with 9 inputs: r2 when
// half, bias when float, so either).
bool InputTypeOk(int32_t pos, DataType t, int32_t nb_inputs) {
  const int index = ContractIndex(pos, nb_inputs, t);
  return index >= 0 && InputDTypeOk(index, ::qexport::trt::ToDType(t));
}

// Reads one int field (kINT32 or kINT64, length 1) into *value.
Status ReadIntField(const PluginField& f, int64_t* value) {
  if (f.length != 1 || !f.data)
    return Status::Error("field '" + std::string(f.name) + "' has length " +
                         std::to_string(f.length) + ", expected one integer");
  if (f.type == PluginFieldType::kINT32)
    *value = *static_cast<const int32_t*>(f.data);
  else if (f.type == PluginFieldType::kINT64)
    *value = *static_cast<const int64_t*>(f.data);
  else
    return Status::Error("field '" + std::string(f.name) + "' has PluginFieldType " +
                         std::to_string(static_cast<int>(f.type)) +
                         ", expected kINT32 or kINT64");
  return Status::Ok();
}

}  // namespace

Status ParseFields(const nvinfer1::PluginFieldCollection* fc, BmlParams* out) noexcept {
  try {
    if (!fc || (fc->nbFields > 0 && !fc->fields))
      return Status::Error("no plugin field collection");
    BmlParams p;
    int64_t* slots[4] = {&p.in_features, &p.out_features, &p.salient_group_size, &p.layout};
    bool seen[4] = {false, false, false, false};
    for (int32_t i = 0; i < fc->nbFields; ++i) {
      const PluginField& f = fc->fields[i];
      if (!f.name) continue;
      for (int a = 0; a < 4; ++a) {
        if (std::strcmp(f.name, kFieldNames[a]) != 0) continue;
        Status st = ReadIntField(f, slots[a]);
        if (!st) return st;
        seen[a] = true;
      }
    }
    for (int a = 0; a < 4; ++a)
      if (!seen[a]) return Status::Error("missing field '" + std::string(kFieldNames[a]) + "'");
    Status st = ValidateAttributes(p);
    if (!st) return st;
    // Serialized as kINT32 (getFieldsToSerialize).
    if (p.in_features > 0x7fffffff)
      return Status::Error("field 'in_features' = " + std::to_string(p.in_features) +
                           " must be below 2^31");
    if (p.out_features > 0x7fffffff)
      return Status::Error("field 'out_features' = " + std::to_string(p.out_features) +
                           " must be below 2^31");
    *out = p;
    return Status::Ok();
  } catch (...) {
    return Status::Error("out of memory while parsing fields");
  }
}

int ContractIndex(int32_t pos, int32_t nb_inputs, DataType input_8_type) noexcept {
  if (pos < 0 || pos >= nb_inputs || nb_inputs < 8 || nb_inputs > kNumInputs) return -1;
  if (pos == kInR2 && nb_inputs == 9 && input_8_type == DataType::kFLOAT) return kInBias;
  return pos;
}

Status CheckInputs(const BmlParams& p, const nvinfer1::Dims* dims, const DataType* types,
                   int32_t nb) noexcept {
  try {
    if (nb < 8 || nb > kNumInputs)
      return Status::Error("got " + std::to_string(nb) + " inputs, expected 8, 9 or 10");
    // The contract's input slots (r2, bias: !present when TensorRT has no such input).
    std::vector<TensorView> in(kNumInputs);
    const DataType input_8_type = nb > kInR2 ? types[kInR2] : DataType::kHALF;
    for (int32_t i = 0; i < nb; ++i) {
      TensorView& t = in[ContractIndex(i, nb, input_8_type)];
      t.present = true;
      t.dtype = ::qexport::trt::ToDType(types[i]);
      t.dtype_name = TypeName(types[i]);
      t.shape = ::qexport::trt::Shape(dims[i]);
    }
    return ValidateShapes(p, in);
  } catch (...) {
    return Status::Error("out of memory while checking inputs");
  }
}

// ------------------------------------------------------------------ BmlPlugin
BmlPlugin::BmlPlugin(const BmlParams& params, const char* plugin_namespace) noexcept
    : params_(params), namespace_(plugin_namespace ? plugin_namespace : kDomain) {}

nvinfer1::IPluginCapability* BmlPlugin::getCapabilityInterface(
    nvinfer1::PluginCapabilityType type) noexcept {
  switch (type) {
    case nvinfer1::PluginCapabilityType::kCORE:
      return static_cast<nvinfer1::IPluginV3OneCore*>(this);
    case nvinfer1::PluginCapabilityType::kBUILD:
      return static_cast<nvinfer1::IPluginV3OneBuild*>(this);
    case nvinfer1::PluginCapabilityType::kRUNTIME:
      return static_cast<nvinfer1::IPluginV3OneRuntime*>(this);
  }
  return nullptr;
}

nvinfer1::IPluginV3* BmlPlugin::clone() noexcept {
  BmlPlugin* p = new (std::nothrow) BmlPlugin(params_, namespace_);
  if (!p) LogError("out of memory in clone()");
  else p->nb_inputs_ = nb_inputs_;
  return p;
}

const char* BmlPlugin::getPluginName() const noexcept { return kOpName; }
const char* BmlPlugin::getPluginVersion() const noexcept { return "1"; }
const char* BmlPlugin::getPluginNamespace() const noexcept { return namespace_; }

int32_t BmlPlugin::configurePlugin(const nvinfer1::DynamicPluginTensorDesc* in, int32_t nb_inputs,
                                   const nvinfer1::DynamicPluginTensorDesc* out,
                                   int32_t nb_outputs) noexcept {
  if (!in || !out || nb_outputs != 1 || nb_inputs < 8 || nb_inputs > kNumInputs) {
    LogError("configurePlugin: expected 8-10 inputs and 1 output");
    return -1;
  }
  nvinfer1::Dims dims[kNumInputs];
  DataType types[kNumInputs];
  for (int32_t i = 0; i < nb_inputs; ++i) {
    dims[i] = in[i].desc.dims;
    types[i] = in[i].desc.type;
  }
  Status st = CheckInputs(params_, dims, types, nb_inputs);
  if (!st) {
    LogError("configurePlugin: " + st.message);
    return -1;
  }
  if (out[0].desc.type != in[0].desc.type) {
    LogError("configurePlugin: output type differs from X's");
    return -1;
  }
  nb_inputs_ = nb_inputs;
  return 0;
}

int32_t BmlPlugin::getOutputDataTypes(DataType* output_types, int32_t nb_outputs,
                                      const DataType* input_types,
                                      int32_t nb_inputs) const noexcept {
  if (!output_types || !input_types || nb_outputs != 1 || nb_inputs < 1) return -1;
  if (input_types[0] != DataType::kFLOAT && input_types[0] != DataType::kHALF) {
    LogError(std::string("input 'X' has type ") + TypeName(input_types[0]) +
             ", expected float or half");
    return -1;
  }
  output_types[0] = input_types[0];
  return 0;
}

int32_t BmlPlugin::getOutputShapes(const nvinfer1::DimsExprs* inputs, int32_t nb_inputs,
                                   const nvinfer1::DimsExprs* /*shape_inputs*/,
                                   int32_t /*nb_shape_inputs*/, nvinfer1::DimsExprs* outputs,
                                   int32_t nb_outputs,
                                   nvinfer1::IExprBuilder& expr_builder) noexcept {
  if (!inputs || !outputs || nb_outputs != 1 || nb_inputs < 8 || nb_inputs > kNumInputs) {
    LogError("getOutputShapes: expected 8-10 inputs and 1 output");
    return -1;
  }
  const nvinfer1::DimsExprs& x = inputs[0];
  if (x.nbDims < 1) {
    LogError("getOutputShapes: input 'X' has rank 0, expected [..., in_features]");
    return -1;
  }
  const nvinfer1::IDimensionExpr* last = x.d[x.nbDims - 1];
  if (last && last->isConstant() && last->getConstantValue() != params_.in_features) {
    LogError("getOutputShapes: input 'X' has " + std::to_string(last->getConstantValue()) +
             " features, expected in_features=" + std::to_string(params_.in_features));
    return -1;
  }
  const nvinfer1::IDimensionExpr* n = expr_builder.constant(params_.out_features);
  if (!n) return -1;
  outputs[0] = x;
  outputs[0].d[x.nbDims - 1] = n;
  return 0;
}

bool BmlPlugin::supportsFormatCombination(int32_t pos,
                                          const nvinfer1::DynamicPluginTensorDesc* in_out,
                                          int32_t nb_inputs, int32_t nb_outputs) noexcept {
  if (!in_out || nb_outputs != 1 || nb_inputs < 8 || nb_inputs > kNumInputs || pos < 0 ||
      pos >= nb_inputs + nb_outputs)
    return false;
  const nvinfer1::PluginTensorDesc& d = in_out[pos].desc;
  if (d.format != TensorFormat::kLINEAR) return false;
  if (pos == nb_inputs) return d.type == in_out[0].desc.type;  // output follows X
  return InputTypeOk(pos, d.type, nb_inputs);
}

size_t BmlPlugin::getWorkspaceSize(const nvinfer1::DynamicPluginTensorDesc* /*inputs*/,
                                   int32_t /*nb_inputs*/,
                                   const nvinfer1::DynamicPluginTensorDesc* /*outputs*/,
                                   int32_t /*nb_outputs*/) const noexcept {
  // binary_channel list, at most in_features entries (S >= 0).
  return bml::cuda::BinaryChannelBytes(params_.in_features, 0);
}

int32_t BmlPlugin::onShapeChange(const nvinfer1::PluginTensorDesc* in, int32_t nb_inputs,
                                 const nvinfer1::PluginTensorDesc* out,
                                 int32_t nb_outputs) noexcept {
  if (!in || !out || nb_outputs != 1 || nb_inputs < 8 || nb_inputs > kNumInputs) return -1;
  nvinfer1::Dims dims[kNumInputs];
  DataType types[kNumInputs];
  for (int32_t i = 0; i < nb_inputs; ++i) {
    dims[i] = in[i].dims;
    types[i] = in[i].type;
  }
  Status st = CheckInputs(params_, dims, types, nb_inputs);
  if (!st) {
    LogError("onShapeChange: " + st.message);
    return -1;
  }
  nb_inputs_ = nb_inputs;
  return 0;
}

int32_t BmlPlugin::enqueue(const nvinfer1::PluginTensorDesc* input_desc,
                           const nvinfer1::PluginTensorDesc* output_desc,
                           const void* const* inputs, void* const* outputs, void* workspace,
                           cudaStream_t stream) noexcept {
  if (!input_desc || !output_desc || !inputs || !outputs) return -1;
  const nvinfer1::Dims& xd = input_desc[kInX].dims;
  if (xd.nbDims < 1 || input_desc[kInSalientIdx].dims.nbDims != 1) return -1;
  int64_t m = 1;
  for (int32_t i = 0; i + 1 < xd.nbDims; ++i) m *= xd.d[i];
  const int64_t k = params_.in_features, n = params_.out_features;
  const int64_t s = input_desc[kInSalientIdx].dims.d[0];
  // TensorRT does not pass the input count to enqueue: onShapeChange (called before the first
  // enqueue and on every shape change) recorded it; input 8 is told apart by its type.
  const int32_t nb_inputs = nb_inputs_;
  if (nb_inputs < 8) {
    LogError("enqueue before onShapeChange");
    return -1;
  }
  const void* r2 = nullptr;
  const void* bias = nullptr;
  const DataType input_8_type = nb_inputs > kInR2 ? input_desc[kInR2].type : DataType::kHALF;
  for (int32_t i = kInR2; i < nb_inputs; ++i)
    (ContractIndex(i, nb_inputs, input_8_type) == kInBias ? bias : r2) = inputs[i];

  bml::cuda::CudaArgs a;
  a.m = m;
  a.k = k;
  a.n = n;
  a.s = s;
  a.group_size = params_.salient_group_size;
  a.act = input_desc[kInX].type == DataType::kHALF ? bml::cuda::Act::kFloat16
                                                   : bml::cuda::Act::kFloat32;
  a.x = inputs[kInX];
  a.y = outputs[0];
  a.sign_packed = static_cast<const uint8_t*>(inputs[kInSignPacked]);
  a.row_scale = static_cast<const uint16_t*>(inputs[kInRowScale]);
  a.row_offset = static_cast<const uint16_t*>(inputs[kInRowOffset]);
  a.salient_idx = static_cast<const int32_t*>(inputs[kInSalientIdx]);
  a.salient_packed = static_cast<const uint8_t*>(inputs[kInSalientPacked]);
  a.salient_scale = static_cast<const uint16_t*>(inputs[kInSalientScale]);
  a.salient_zero = static_cast<const uint8_t*>(inputs[kInSalientZero]);
  a.r2 = static_cast<const uint16_t*>(r2);
  a.bias = static_cast<const float*>(bias);
  int32_t* bc = static_cast<int32_t*>(workspace);
  a.binary_channel = bc;
  if (k > s) {
    Status st = bml::cuda::LaunchPrepare(a.salient_idx, nullptr, k, s, n, 0, bc, nullptr, stream);
    if (!st) {
      LogError("enqueue: " + st.message);
      return -1;
    }
  }
  Status st = bml::cuda::Launch(a, bml::cuda::Path::kAuto, stream);
  if (!st) {
    LogError("enqueue: " + st.message);
    return -1;
  }
  return 0;
}

nvinfer1::IPluginV3* BmlPlugin::attachToContext(nvinfer1::IPluginResourceContext*) noexcept {
  return clone();
}

const nvinfer1::PluginFieldCollection* BmlPlugin::getFieldsToSerialize() noexcept {
  try {
    const int64_t values[4] = {params_.in_features, params_.out_features,
                               params_.salient_group_size, params_.layout};
    fields_.clear();
    for (int a = 0; a < 4; ++a) {
      serialized_[a] = static_cast<int32_t>(values[a]);  // ranges checked by ParseFields
      fields_.emplace_back(kFieldNames[a], &serialized_[a], PluginFieldType::kINT32, 1);
    }
    fc_.nbFields = static_cast<int32_t>(fields_.size());
    fc_.fields = fields_.data();
    return &fc_;
  } catch (...) {
    LogError("out of memory in getFieldsToSerialize()");
    return nullptr;
  }
}

// ------------------------------------------------------------------ BmlPluginCreator
BmlPluginCreator::BmlPluginCreator(const char* plugin_namespace) noexcept
    : namespace_(plugin_namespace) {
  try {
    for (const char* name : kFieldNames)
      fields_.emplace_back(name, nullptr, PluginFieldType::kINT32, 1);
  } catch (...) {
    fields_.clear();
  }
  fc_.nbFields = static_cast<int32_t>(fields_.size());
  fc_.fields = fields_.data();
}

nvinfer1::IPluginV3* BmlPluginCreator::createPlugin(const char* name,
                                                    const nvinfer1::PluginFieldCollection* fc,
                                                    nvinfer1::TensorRTPhase /*phase*/) noexcept {
  BmlParams p;
  Status st = ParseFields(fc, &p);
  if (!st) {
    LogError(std::string("layer '") + (name ? name : "") + "': " + st.message);
    return nullptr;
  }
  BmlPlugin* plugin = new (std::nothrow) BmlPlugin(p, namespace_);
  if (!plugin) LogError("out of memory in createPlugin()");
  return plugin;
}

const nvinfer1::PluginFieldCollection* BmlPluginCreator::getFieldNames() noexcept { return &fc_; }
const char* BmlPluginCreator::getPluginName() const noexcept { return kOpName; }
const char* BmlPluginCreator::getPluginVersion() const noexcept { return "1"; }
const char* BmlPluginCreator::getPluginNamespace() const noexcept { return namespace_; }

}  // namespace trt
}  // namespace bml
}  // namespace qexport
