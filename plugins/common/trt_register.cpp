// Entry points of libqexport_trt.so, the qexport TensorRT plugin library (docs/gpu.md):
//   getCreators: TensorRT loads the library (IPluginRegistry::loadLibrary, trtexec
//     --staticPlugins / --dynamicPlugins, the Python builder in qexport/targets/trt.py) and registers
//     every creator returned here;
//   setLoggerFinder: TensorRT hands over its logger finder (plugin errors go to its logger);
//   qexport_contract_version: lets qexport check the library matches the Python side.
// No REGISTER_TENSORRT_PLUGIN / getPluginRegistry: those need libnvinfer at link time, and this
// library links no TensorRT library at all (-Wl,--no-undefined holds without one).
//
// Two creators per plugin: namespace "qexport" (the canonical one, what qexport's engine
// builder asks for by setting plugin_namespace on the ONNX nodes) and namespace "" (what
// TensorRT's ONNX parser looks up for a node without a plugin_namespace attribute, e.g.
// `trtexec --onnx=model.onnx --staticPlugins=libqexport_trt.so` on an unmodified export).
//
// The ops, one line each in Creators below (and one include); the op's sources come from its
// folder's CMakeLists.txt.
#include <NvInferRuntime.h>

#include <cstdint>

#include "binary_mixed_linear/trt_plugin.h"
#include "qexport_contract.h"
#include "qexport_trt.h"

#define QEXPORT_EXPORT __attribute__((visibility("default")))

namespace {

// The creators handed to TensorRT (fixed storage: nothing is allocated at load time).
struct Creators {
  static constexpr int32_t kMax = 16;  // 8 plugins
  nvinfer1::IPluginCreatorInterface* list[kMax] = {};
  int32_t count = 0;

  // The two creators of a plugin (Creator takes its namespace; they live for the process).
  template <typename Creator>
  void Add() {
    static Creator canonical(qexport::kDomain);
    static Creator unnamed("");
    if (count + 2 > kMax) return;  // raise kMax
    list[count++] = &canonical;
    list[count++] = &unnamed;
  }
};

const Creators& AllCreators() {
  static const Creators creators = [] {
    Creators c;
    c.Add<qexport::bml::trt::BmlPluginCreator>();
    return c;
  }();
  return creators;
}

}  // namespace

extern "C" {

QEXPORT_EXPORT nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators) {
  const Creators& creators = AllCreators();
  nbCreators = creators.count;
  return creators.list;
}

QEXPORT_EXPORT void setLoggerFinder(nvinfer1::ILoggerFinder* finder) {
  qexport::trt::SetLoggerFinder(finder);
}

QEXPORT_EXPORT int qexport_contract_version() { return qexport::kContractVersion; }

}  // extern "C"
