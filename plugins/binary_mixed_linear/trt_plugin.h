// TensorRT glue of qexport::BinaryMixedLinear: an IPluginV3 (OneCore/OneBuild/OneRuntime) and
// its IPluginCreatorV3One, exported by libqexport_trt.so through getCreators()
// (plugins/common/trt_register.cpp). Plugin name "BinaryMixedLinear" (bml_contract.h), version
// "1", namespace "qexport" (qexport_contract.h) or ""; see docs/gpu.md for how TensorRT's ONNX
// parser finds it. Every method is noexcept; failures are logged through the ILoggerFinder
// TensorRT hands to setLoggerFinder (plugins/common/qexport_trt.h) and reported as -1 /
// nullptr / false. Attribute and shape rules are the shared validator's (bml_validate.h).
#pragma once

#include <NvInferRuntime.h>

#include <cstdint>
#include <string>
#include <vector>

#include "binary_mixed_linear/bml_validate.h"
#include "qexport_status.h"

namespace qexport {
namespace bml {
namespace trt {

// The op's attributes, as plugin fields.
using BmlParams = Attributes;

// Reads the four attribute fields (kINT32 or kINT64, length 1) from `fc`; unknown fields
// (e.g. plugin_namespace, plugin_version from the ONNX parser) are ignored. Checks the values
// with bml::ValidateAttributes, and that in/out_features fit in int32 (serialized as kINT32).
Status ParseFields(const nvinfer1::PluginFieldCollection* fc, BmlParams* out) noexcept;

// Contract index of TensorRT input `pos`: TensorRT passes only the inputs that exist, so with
// nb_inputs = 9 input 8 is r2 when half and bias when float (input_8_type); -1 out of range.
int ContractIndex(int32_t pos, int32_t nb_inputs, nvinfer1::DataType input_8_type) noexcept;

// Types and shapes of the inputs, checked by bml::ValidateShapes (-1 dims, unknown at build
// time, accepted). nb_inputs is 8 (no r2, no bias), 9 (r2 if input 8 is half, bias if it is
// float) or 10.
Status CheckInputs(const BmlParams& p, const nvinfer1::Dims* dims,
                   const nvinfer1::DataType* types, int32_t nb_inputs) noexcept;

class BmlPlugin final : public nvinfer1::IPluginV3,
                        public nvinfer1::IPluginV3OneCore,
                        public nvinfer1::IPluginV3OneBuild,
                        public nvinfer1::IPluginV3OneRuntime {
 public:
  BmlPlugin(const BmlParams& params, const char* plugin_namespace) noexcept;
  ~BmlPlugin() override = default;

  const BmlParams& params() const noexcept { return params_; }

  // IPluginV3
  nvinfer1::IPluginCapability* getCapabilityInterface(
      nvinfer1::PluginCapabilityType type) noexcept override;
  nvinfer1::IPluginV3* clone() noexcept override;

  // IPluginV3OneCore
  const char* getPluginName() const noexcept override;
  const char* getPluginVersion() const noexcept override;
  const char* getPluginNamespace() const noexcept override;

  // IPluginV3OneBuild
  int32_t getNbOutputs() const noexcept override { return 1; }
  int32_t configurePlugin(const nvinfer1::DynamicPluginTensorDesc* in, int32_t nb_inputs,
                          const nvinfer1::DynamicPluginTensorDesc* out,
                          int32_t nb_outputs) noexcept override;
  int32_t getOutputDataTypes(nvinfer1::DataType* output_types, int32_t nb_outputs,
                             const nvinfer1::DataType* input_types,
                             int32_t nb_inputs) const noexcept override;
  int32_t getOutputShapes(const nvinfer1::DimsExprs* inputs, int32_t nb_inputs,
                          const nvinfer1::DimsExprs* shape_inputs, int32_t nb_shape_inputs,
                          nvinfer1::DimsExprs* outputs, int32_t nb_outputs,
                          nvinfer1::IExprBuilder& expr_builder) noexcept override;
  bool supportsFormatCombination(int32_t pos, const nvinfer1::DynamicPluginTensorDesc* in_out,
                                 int32_t nb_inputs, int32_t nb_outputs) noexcept override;
  size_t getWorkspaceSize(const nvinfer1::DynamicPluginTensorDesc* inputs, int32_t nb_inputs,
                          const nvinfer1::DynamicPluginTensorDesc* outputs,
                          int32_t nb_outputs) const noexcept override;

  // IPluginV3OneRuntime
  int32_t onShapeChange(const nvinfer1::PluginTensorDesc* in, int32_t nb_inputs,
                        const nvinfer1::PluginTensorDesc* out,
                        int32_t nb_outputs) noexcept override;
  int32_t enqueue(const nvinfer1::PluginTensorDesc* input_desc,
                  const nvinfer1::PluginTensorDesc* output_desc, const void* const* inputs,
                  void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;
  nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
  const nvinfer1::PluginFieldCollection* getFieldsToSerialize() noexcept override;

 private:
  BmlParams params_;
  const char* namespace_;
  int32_t nb_inputs_ = 0;  // 8-10, from configurePlugin / onShapeChange
  int32_t serialized_[4] = {0, 0, 0, 0};
  std::vector<nvinfer1::PluginField> fields_;
  nvinfer1::PluginFieldCollection fc_{};
};

class BmlPluginCreator final : public nvinfer1::IPluginCreatorV3One {
 public:
  // plugin_namespace must outlive the creator (a string literal).
  explicit BmlPluginCreator(const char* plugin_namespace) noexcept;
  nvinfer1::IPluginV3* createPlugin(const char* name, const nvinfer1::PluginFieldCollection* fc,
                                    nvinfer1::TensorRTPhase phase) noexcept override;
  const nvinfer1::PluginFieldCollection* getFieldNames() noexcept override;
  const char* getPluginName() const noexcept override;
  const char* getPluginVersion() const noexcept override;
  const char* getPluginNamespace() const noexcept override;

 private:
  const char* namespace_;
  std::vector<nvinfer1::PluginField> fields_;
  nvinfer1::PluginFieldCollection fc_{};
};

}  // namespace trt
}  // namespace bml
}  // namespace qexport
