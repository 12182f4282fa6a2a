// ONNX Runtime glue every op shares: element type names, OrtStatus handling, the noexcept
// wrapper of kernel entry points, reading a node's name and int attributes, describing a call's
// inputs as TensorViews, which inputs are constant initializers, and a ParallelFor over the
// kernel context's thread pool. Each op's own glue (schema, kernels) is in its folder
// (e.g. plugins/binary_mixed_linear/ort_op_base.h).
//
// Errors are returned as a message (empty on success), unprefixed: Guard adds the op/node
// prefix. The library is built with ORT_API_MANUAL_INIT: the API table is the one
// RegisterCustomOps received (ort_register.cpp).
#pragma once

#include <cstddef>
#include <cstdint>
#include <exception>
#include <initializer_list>
#include <string>
#include <vector>

#include "onnxruntime_cxx_api.h"
#include "qexport_parallel.h"
#include "qexport_tensor.h"

namespace qexport {
namespace ort {

// Name of an element type for messages ("float", "int64", ...).
std::string TypeName(ONNXTensorElementDataType t);
DType ToDType(ONNXTensorElementDataType t);

// Takes ownership of an OrtStatus from an API call; returns its message (empty if ok).
std::string TakeError(const OrtApi& api, OrtStatus* status);

// The node's name; best effort (empty when it has none or ORT cannot tell).
std::string NodeName(const OrtApi& api, const OrtKernelInfo* info);

// Reads int attributes into their values; an error names the first missing or non-int one.
struct IntAttribute {
  const char* name;
  int64_t* value;
};
std::string ReadIntAttributes(const OrtApi& api, const OrtKernelInfo* info,
                              std::initializer_list<IntAttribute> attributes);

// Describes the call's inputs in `slots` TensorViews (omitted optional ones and slots past the
// node's input count stay !present). input_name(i) names input i in messages. A vector reused
// across calls keeps its shapes' storage (no allocation).
std::string GatherInputs(const OrtApi& api, OrtKernelContext* ctx, size_t slots,
                         const char* (*input_name)(int), std::vector<TensorView>* in);

// Per input slot (of `slots`): whether the node's input is a constant initializer. Input 0 never
// counts (the activations).
std::vector<bool> ConstantInputs(const OrtApi& api, const OrtKernelInfo* info, size_t slots);

// A ParallelFor over the kernel context's intra-op thread pool (KernelContext_ParallelFor), so
// that the session's intra_op_num_threads governs the kernel; serial when ORT offers no pool.
// Valid while this object and the context live.
class OrtThreadPool {
 public:
  OrtThreadPool(const OrtApi& api, OrtKernelContext* ctx) : api_(&api), ctx_(ctx) {}
  ParallelFor parallel_for() {
    ParallelFor p;
    p.run = &Run;
    p.pool = this;
    return p;
  }

 private:
  static void Run(void* pool, void (*task)(void*, size_t), size_t total, void* data);
  const OrtApi* api_;
  OrtKernelContext* ctx_;
};

// Runs f() -> error message. A message becomes ORT_INVALID_ARGUMENT, an exception ORT_FAIL,
// both prefixed with node.Prefix() (read afterwards, so f may fill in the node's name).
template <typename Node, typename F>
OrtStatusPtr Guard(const OrtApi& api, const Node& node, F&& f) noexcept {
  try {
    std::string err = f();
    if (err.empty()) return nullptr;
    return api.CreateStatus(ORT_INVALID_ARGUMENT, (node.Prefix() + err).c_str());
  } catch (const std::exception& e) {
    return api.CreateStatus(ORT_FAIL, (node.Prefix() + e.what()).c_str());
  } catch (...) {
    return api.CreateStatus(ORT_FAIL, (node.Prefix() + "unknown error").c_str());
  }
}

}  // namespace ort
}  // namespace qexport
