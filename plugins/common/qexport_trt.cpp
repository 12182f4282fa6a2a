// TensorRT glue every op's plugin shares (qexport_trt.h).
#include "qexport_trt.h"

#include <atomic>

namespace qexport {
namespace trt {
namespace {

std::atomic<nvinfer1::ILoggerFinder*> g_logger_finder{nullptr};

}  // namespace

void SetLoggerFinder(nvinfer1::ILoggerFinder* finder) noexcept { g_logger_finder = finder; }

void LogError(const std::string& msg) noexcept {
  nvinfer1::ILoggerFinder* finder = g_logger_finder.load();
  nvinfer1::ILogger* logger = finder ? finder->findLogger() : nullptr;
  if (logger) logger->log(nvinfer1::ILogger::Severity::kERROR, msg.c_str());
}

std::vector<int64_t> Shape(const nvinfer1::Dims& dims) {
  return std::vector<int64_t>(dims.d, dims.d + (dims.nbDims > 0 ? dims.nbDims : 0));
}

DType ToDType(nvinfer1::DataType t) {
  switch (t) {
    case nvinfer1::DataType::kFLOAT: return DType::kFloat32;
    case nvinfer1::DataType::kHALF: return DType::kFloat16;
    case nvinfer1::DataType::kUINT8:
    case nvinfer1::DataType::kINT8: return DType::kUint8;
    case nvinfer1::DataType::kINT32: return DType::kInt32;
    default: return DType::kOther;
  }
}

const char* TypeName(nvinfer1::DataType t) {
  switch (t) {
    case nvinfer1::DataType::kFLOAT: return "float";
    case nvinfer1::DataType::kHALF: return "half";
    case nvinfer1::DataType::kINT8: return "int8";
    case nvinfer1::DataType::kINT32: return "int32";
    case nvinfer1::DataType::kUINT8: return "uint8";
    case nvinfer1::DataType::kINT64: return "int64";
    case nvinfer1::DataType::kBOOL: return "bool";
    case nvinfer1::DataType::kBF16: return "bf16";
    default: return "other";
  }
}

}  // namespace trt
}  // namespace qexport
