// ONNX Runtime glue of qexport::BinaryMixedLinear: the registration of its custom-op objects
// (plugins/common/ort_register.cpp).
#pragma once

#include "onnxruntime_cxx_api.h"

namespace qexport {

// Adds every BinaryMixedLinear variant to `domain`: float and float16 activations on the CPU
// execution provider, and on the CUDA one when built with QEXPORT_BUILD_CUDA (ort_cuda_op.h).
void AddBinaryMixedLinearOps(Ort::CustomOpDomain& domain);

}  // namespace qexport
