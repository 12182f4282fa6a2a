// TensorRT glue every op's plugin shares: the logger TensorRT hands to setLoggerFinder
// (trt_register.cpp), and plugin dims as a TensorView shape. Each op's plugin is in its folder
// (e.g. plugins/binary_mixed_linear/trt_plugin.h).
#pragma once

#include <NvInferRuntime.h>

#include <cstdint>
#include <string>
#include <vector>

#include "qexport_tensor.h"

namespace qexport {
namespace trt {

// Where LogError writes: the logger of the finder TensorRT handed over (none yet: nowhere).
void SetLoggerFinder(nvinfer1::ILoggerFinder* finder) noexcept;
// Logs one line at kERROR severity (the caller adds its op prefix).
void LogError(const std::string& msg) noexcept;

// The dims as a TensorView shape (-1, unknown at build time, stays -1).
std::vector<int64_t> Shape(const nvinfer1::Dims& dims);

// DType of a TensorRT element type (kINT8 as kUint8: a byte is a byte) and its name for
// messages ("float", "half", ...).
DType ToDType(nvinfer1::DataType t);
const char* TypeName(nvinfer1::DataType t);

}  // namespace trt
}  // namespace qexport
