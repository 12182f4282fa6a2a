// Entry points of libqexport_trt.so, the qexport TensorRT plugin library (docs/gpu.md):
//   getCreators: TensorRT loads the library (IPluginRegistry::loadLibrary, trtexec
//     --staticPlugins / --dynamicPlugins, the Python builder in qexport/trt.py) and registers
//     every creator returned here;
//   setLoggerFinder: TensorRT hands over its logger finder (plugin errors go to its logger);
//   qexport_contract_version: lets qexport check the library matches the Python side.
// No REGISTER_TENSORRT_PLUGIN / getPluginRegistry: those need libnvinfer at link time, and this
// library links no TensorRT library at all (-Wl,--no-undefined holds without one).
//
// Two creators of the same plugin: namespace "qexport" (the canonical one, what qexport's
// engine builder asks for by setting plugin_namespace on the ONNX nodes) and namespace ""
// (what TensorRT's ONNX parser looks up for a node without a plugin_namespace attribute, e.g.
// `trtexec --onnx=model.onnx --staticPlugins=libqexport_trt.so` on an unmodified export).
#include <NvInferRuntime.h>

#include "binary_mixed_linear/trt_plugin.h"
#include "qexport_contract.h"

#define QEXPORT_EXPORT __attribute__((visibility("default")))

extern "C" {

QEXPORT_EXPORT nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators) {
  static qexport::trt::BmlPluginCreator creator_qexport(qexport::kDomain);
  static qexport::trt::BmlPluginCreator creator_default("");
  static nvinfer1::IPluginCreatorInterface* const creators[] = {&creator_qexport,
                                                                &creator_default};
  nbCreators = 2;
  return creators;
}

QEXPORT_EXPORT void setLoggerFinder(nvinfer1::ILoggerFinder* finder) {
  qexport::trt::SetLoggerFinder(finder);
}

QEXPORT_EXPORT int qexport_contract_version() { return qexport::kContractVersion; }

}  // extern "C"
