// ONNX Runtime glue of qexport::BinaryMixedLinear for the CUDA execution provider. Built into
// libqexport_ops.so when QEXPORT_BUILD_CUDA is ON and added by AddBinaryMixedLinearOps
// (ort_op.cpp; docs/gpu.md).
#pragma once

#include "onnxruntime_cxx_api.h"

namespace qexport {

// Adds the CUDAExecutionProvider variants (float, float16 activations) to `domain`.
void AddBinaryMixedLinearCudaOps(Ort::CustomOpDomain& domain);

}  // namespace qexport
