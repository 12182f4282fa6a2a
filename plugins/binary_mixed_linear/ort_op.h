// ONNX Runtime glue of qexport::BinaryMixedLinear: the custom-op objects registered by
// plugins/ort_register.cpp (one per activation type: float, float16).
#pragma once

#include "onnxruntime_cxx_api.h"

namespace qexport {

// Adds every BinaryMixedLinear variant (float, float16 activations) to `domain`.
void AddBinaryMixedLinearOps(Ort::CustomOpDomain& domain);

}  // namespace qexport
