// qexport sample 03: load the qexport TensorRT plugins, deserialize an engine, run it on the
// inputs of a reference.bin (format: samples/02_cpp_ort/README.md) and compare its outputs.
//   qexport_sample_trt ENGINE REFERENCE_BIN [--plugins libqexport_trt.so]
// Exit status: 0 ok, 1 an output's cosine similarity < 0.999, 2 an error.
#include <NvInferRuntime.h>
#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

struct Logger : nvinfer1::ILogger {
  void log(Severity severity, const char* msg) noexcept override {
    if (severity <= Severity::kWARNING) std::fprintf(stderr, "[TensorRT] %s\n", msg);
  }
} g_logger;

void Check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}

struct Tensor {
  uint32_t onnx_type = 0;  // 1 float, 6 int32, 7 int64, 10 float16
  std::vector<int64_t> dims;
  std::vector<char> data;
};

size_t ElemSize(uint32_t t) {
  switch (t) {
    case 1: case 6: return 4;
    case 7: return 8;
    case 10: return 2;
    default: throw std::runtime_error("unsupported element type " + std::to_string(t));
  }
}

std::map<std::string, Tensor> ReadReference(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot open " + path);
  auto rd = [&](void* p, size_t n) {
    if (!f.read(static_cast<char*>(p), static_cast<std::streamsize>(n)))
      throw std::runtime_error(path + ": truncated");
  };
  char magic[8];
  rd(magic, 8);
  if (std::memcmp(magic, "QXREF001", 8) != 0) throw std::runtime_error(path + ": bad magic");
  uint32_t count = 0;
  rd(&count, 4);
  std::map<std::string, Tensor> out;
  for (uint32_t i = 0; i < count; ++i) {
    uint32_t len = 0, rank = 0;
    rd(&len, 4);
    std::string name(len, '\0');
    rd(&name[0], len);
    Tensor t;
    rd(&t.onnx_type, 4);
    rd(&rank, 4);
    t.dims.resize(rank);
    size_t n = 1;
    for (auto& d : t.dims) {
      rd(&d, 8);
      n *= static_cast<size_t>(d);
    }
    t.data.resize(n * ElemSize(t.onnx_type));
    rd(t.data.data(), t.data.size());
    out[name] = std::move(t);
  }
  return out;
}

float HalfToFloat(uint16_t h) {
  const uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
  if (exp == 0) return (sign ? -1.0f : 1.0f) * std::ldexp(static_cast<float>(mant), -24);
  uint32_t bits = exp == 0x1f ? (sign | 0x7f800000u | (mant << 13))
                              : (sign | ((exp + 112) << 23) | (mant << 13));
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

std::vector<double> AsDouble(const char* p, size_t n, nvinfer1::DataType t) {
  std::vector<double> v(n);
  for (size_t i = 0; i < n; ++i) {
    switch (t) {
      case nvinfer1::DataType::kFLOAT: { float x; std::memcpy(&x, p + 4 * i, 4); v[i] = x; break; }
      case nvinfer1::DataType::kHALF: { uint16_t x; std::memcpy(&x, p + 2 * i, 2); v[i] = HalfToFloat(x); break; }
      case nvinfer1::DataType::kINT32: { int32_t x; std::memcpy(&x, p + 4 * i, 4); v[i] = x; break; }
      case nvinfer1::DataType::kINT64: { int64_t x; std::memcpy(&x, p + 8 * i, 8); v[i] = static_cast<double>(x); break; }
      default: throw std::runtime_error("unsupported output type");
    }
  }
  return v;
}

size_t TrtSize(nvinfer1::DataType t) {
  switch (t) {
    case nvinfer1::DataType::kFLOAT: case nvinfer1::DataType::kINT32: return 4;
    case nvinfer1::DataType::kHALF: return 2;
    case nvinfer1::DataType::kINT64: return 8;
    default: throw std::runtime_error("unsupported tensor type");
  }
}

int Run(int argc, char** argv) {
  std::string engine_path, ref_path, plugins = "libqexport_trt.so";
  std::vector<std::string> pos;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--plugins" && i + 1 < argc) plugins = argv[++i];
    else pos.push_back(a);
  }
  if (pos.size() != 2) {
    std::fprintf(stderr, "usage: %s ENGINE REFERENCE_BIN [--plugins libqexport_trt.so]\n", argv[0]);
    return 2;
  }
  engine_path = pos[0];
  ref_path = pos[1];
  auto refs = ReadReference(ref_path);

  std::unique_ptr<nvinfer1::IRuntime> runtime(nvinfer1::createInferRuntime(g_logger));
  if (!runtime) throw std::runtime_error("createInferRuntime failed");
  if (!runtime->getPluginRegistry().loadLibrary(plugins.c_str()))
    throw std::runtime_error("TensorRT could not load the plugin library " + plugins);
  std::ifstream ef(engine_path, std::ios::binary);
  if (!ef) throw std::runtime_error("cannot open " + engine_path);
  std::vector<char> blob((std::istreambuf_iterator<char>(ef)), std::istreambuf_iterator<char>());
  std::unique_ptr<nvinfer1::ICudaEngine> engine(
      runtime->deserializeCudaEngine(blob.data(), blob.size()));
  if (!engine) throw std::runtime_error("cannot deserialize " + engine_path);
  std::unique_ptr<nvinfer1::IExecutionContext> ctx(engine->createExecutionContext());
  if (!ctx) throw std::runtime_error("createExecutionContext failed");

  cudaStream_t stream;
  Check(cudaStreamCreate(&stream), "cudaStreamCreate");
  std::vector<void*> buffers;
  std::vector<std::string> outputs;
  for (int32_t i = 0; i < engine->getNbIOTensors(); ++i) {
    const char* name = engine->getIOTensorName(i);
    if (engine->getTensorIOMode(name) != nvinfer1::TensorIOMode::kINPUT) {
      outputs.push_back(name);
      continue;
    }
    auto it = refs.find(name);
    if (it == refs.end()) throw std::runtime_error(std::string("reference has no input ") + name);
    const Tensor& t = it->second;
    if (ElemSize(t.onnx_type) != TrtSize(engine->getTensorDataType(name)))
      throw std::runtime_error(std::string("input ") + name + ": element type differs from the engine's");
    nvinfer1::Dims d{};
    d.nbDims = static_cast<int32_t>(t.dims.size());
    for (size_t k = 0; k < t.dims.size(); ++k) d.d[k] = t.dims[k];
    if (!ctx->setInputShape(name, d)) throw std::runtime_error(std::string("bad shape for ") + name);
    void* p = nullptr;
    Check(cudaMalloc(&p, t.data.size() ? t.data.size() : 1), "cudaMalloc");
    buffers.push_back(p);
    Check(cudaMemcpyAsync(p, t.data.data(), t.data.size(), cudaMemcpyHostToDevice, stream), "copy in");
    ctx->setTensorAddress(name, p);
  }
  std::vector<std::pair<std::string, std::pair<void*, size_t>>> outs;
  for (const auto& name : outputs) {
    nvinfer1::Dims d = ctx->getTensorShape(name.c_str());
    size_t n = 1;
    for (int32_t k = 0; k < d.nbDims; ++k) n *= static_cast<size_t>(d.d[k]);
    const size_t bytes = n * TrtSize(engine->getTensorDataType(name.c_str()));
    void* p = nullptr;
    Check(cudaMalloc(&p, bytes ? bytes : 1), "cudaMalloc");
    buffers.push_back(p);
    ctx->setTensorAddress(name.c_str(), p);
    outs.push_back({name, {p, n}});
  }
  if (!ctx->enqueueV3(stream)) throw std::runtime_error("enqueueV3 failed");
  Check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");

  int status = 0;
  for (const auto& o : outs) {
    const nvinfer1::DataType type = engine->getTensorDataType(o.first.c_str());
    std::vector<char> host(o.second.second * TrtSize(type));
    Check(cudaMemcpy(host.data(), o.second.first, host.size(), cudaMemcpyDeviceToHost), "copy out");
    std::vector<double> y = AsDouble(host.data(), o.second.second, type);
    double sum = 0;
    for (double v : y) sum += v;
    auto it = refs.find(o.first);
    if (it == refs.end()) {
      std::printf("%s: %zu values, sum %.6g (no reference)\n", o.first.c_str(), y.size(), sum);
      continue;
    }
    const Tensor& t = it->second;
    const nvinfer1::DataType rt = t.onnx_type == 10 ? nvinfer1::DataType::kHALF
                                : t.onnx_type == 1  ? nvinfer1::DataType::kFLOAT
                                : t.onnx_type == 6  ? nvinfer1::DataType::kINT32
                                                    : nvinfer1::DataType::kINT64;
    std::vector<double> r = AsDouble(t.data.data(), t.data.size() / ElemSize(t.onnx_type), rt);
    if (r.size() != y.size()) throw std::runtime_error(o.first + ": size differs from reference");
    double maxdiff = 0, dot = 0, ny = 0, nr = 0;
    for (size_t i = 0; i < y.size(); ++i) {
      maxdiff = std::max(maxdiff, std::fabs(y[i] - r[i]));
      dot += y[i] * r[i];
      ny += y[i] * y[i];
      nr += r[i] * r[i];
    }
    const double cosine = (ny > 0 && nr > 0) ? dot / std::sqrt(ny * nr) : (ny == nr ? 1.0 : 0.0);
    std::printf("%s: %zu values, max abs diff %.4g, cosine %.6f\n", o.first.c_str(), y.size(),
                maxdiff, cosine);
    if (cosine < 0.999) status = 1;
  }
  for (void* p : buffers) cudaFree(p);
  cudaStreamDestroy(stream);
  return status;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return Run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "qexport_sample_trt: error: %s\n", e.what());
    return 2;
  }
}
