// Run an exported qexport model folder with ONNX Runtime's C++ API.
//
//   qexport_sample OUT_DIR [--lib PATH] [--threads N] [--batch B] [--seq S]
//   qexport_sample OUT_DIR --generate N [--lib PATH] [--threads N]
//   qexport_sample OUT_DIR --concurrency T [--lib PATH] [--threads N]
//
// Loads OUT_DIR/model.onnx, registers the op library (--lib, else OUT_DIR/libqexport_ops.so,
// else $QEXPORT_OPS_LIBRARY) with Ort::SessionOptions::RegisterCustomOpsLibrary, feeds inputs
// and prints each output's shape and checksum. With OUT_DIR/reference.bin (README.md) its
// inputs are fed and the outputs compared: max abs diff and cosine; exit status 1 if a cosine
// is below 0.999. Without it, inputs are deterministic pseudo-random values: token ids below
// the metadata "qexport.vocab_size" (else 100) for int64 inputs, normal values for float ones.
// With OUT_DIR/model_with_past.onnx (qexport --kv-cache) and input_ids and logits in
// reference.bin, it also runs the generation loop of that decoder (RunKvCache) and compares
// the logits it returns with the reference's.
// With --generate N it generates text instead: up to N tokens, greedily, after the prompt in
// OUT_DIR/prompt.bin (written by write_prompt.py: the prompt's token ids, the stop ids and
// each token's bytes), through model_with_past.onnx, streaming the text as it comes.
// With --concurrency T it checks that one session serves many threads (RunConcurrent).
#include <onnxruntime_cxx_api.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace {

constexpr double kMinCosine = 0.999;
constexpr char kMagic[8] = {'Q', 'X', 'R', 'E', 'F', '0', '0', '1'};
constexpr char kPromptMagic[8] = {'Q', 'X', 'P', 'R', 'M', '0', '0', '1'};

struct HostTensor {
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  std::vector<int64_t> dims;
  std::vector<uint8_t> bytes;
};

size_t ElementSize(ONNXTensorElementDataType t) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT:
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: return 4;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return 8;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return 2;
    default: throw std::runtime_error("unsupported element type " + std::to_string(t));
  }
}

int64_t Count(const std::vector<int64_t>& dims) {
  int64_t n = 1;
  for (int64_t d : dims) n *= d;
  return n;
}

std::string ShapeString(const std::vector<int64_t>& dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + "]";
}

template <typename T>
T ReadPod(std::ifstream& in, const char* file = "reference.bin") {
  T v;
  if (!in.read(reinterpret_cast<char*>(&v), sizeof v))
    throw std::runtime_error(std::string(file) + ": truncated");
  return v;
}

// reference.bin, little endian: "QXREF001", u32 count, then per tensor: u32 name length,
// name bytes, u32 ONNX element type, u32 rank, i64 dims[rank], raw data.
std::map<std::string, HostTensor> ReadReference(const std::string& path) {
  std::map<std::string, HostTensor> out;
  std::ifstream in(path, std::ios::binary);
  if (!in) return out;
  char magic[8];
  if (!in.read(magic, 8) || std::memcmp(magic, kMagic, 8) != 0)
    throw std::runtime_error(path + ": not a reference.bin (bad magic)");
  const uint32_t count = ReadPod<uint32_t>(in);
  for (uint32_t i = 0; i < count; ++i) {
    std::string name(ReadPod<uint32_t>(in), '\0');
    if (!in.read(&name[0], static_cast<std::streamsize>(name.size())))
      throw std::runtime_error("reference.bin: truncated name");
    HostTensor t;
    t.type = static_cast<ONNXTensorElementDataType>(ReadPod<uint32_t>(in));
    const uint32_t rank = ReadPod<uint32_t>(in);
    for (uint32_t d = 0; d < rank; ++d) t.dims.push_back(ReadPod<int64_t>(in));
    t.bytes.resize(static_cast<size_t>(Count(t.dims)) * ElementSize(t.type));
    if (!in.read(reinterpret_cast<char*>(t.bytes.data()), static_cast<std::streamsize>(t.bytes.size())))
      throw std::runtime_error("reference.bin: truncated data of " + name);
    out[name] = std::move(t);
  }
  return out;
}

std::vector<double> ToDoubles(ONNXTensorElementDataType type, const void* data, int64_t n) {
  std::vector<double> v(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    switch (type) {
      case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: v[i] = static_cast<const float*>(data)[i]; break;
      case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16:
        v[i] = static_cast<const Ort::Float16_t*>(data)[i].ToFloat();
        break;
      case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: v[i] = static_cast<const int32_t*>(data)[i]; break;
      case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64:
        v[i] = static_cast<double>(static_cast<const int64_t*>(data)[i]);
        break;
      default: throw std::runtime_error("unsupported output element type " + std::to_string(type));
    }
  }
  return v;
}

HostTensor MakeInput(ONNXTensorElementDataType type, std::vector<int64_t> dims, int64_t vocab,
                     int64_t batch, int64_t seq, std::mt19937_64& rng) {
  int symbolic = 0;
  for (int64_t& d : dims)
    if (d < 0) d = symbolic++ == 0 ? batch : seq;
  HostTensor t;
  t.type = type;
  t.dims = dims;
  const int64_t n = Count(dims);
  t.bytes.resize(static_cast<size_t>(n) * ElementSize(type));
  std::uniform_int_distribution<int64_t> ids(0, vocab - 1);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (int64_t i = 0; i < n; ++i) {
    switch (type) {
      case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: reinterpret_cast<int64_t*>(t.bytes.data())[i] = ids(rng); break;
      case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32:
        reinterpret_cast<int32_t*>(t.bytes.data())[i] = static_cast<int32_t>(ids(rng));
        break;
      case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: reinterpret_cast<float*>(t.bytes.data())[i] = normal(rng); break;
      case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16:
        reinterpret_cast<Ort::Float16_t*>(t.bytes.data())[i] = Ort::Float16_t(normal(rng));
        break;
      default: throw std::runtime_error("unsupported input element type " + std::to_string(type));
    }
  }
  return t;
}

bool FileExists(const std::string& p) { return std::ifstream(p).good(); }

// Max abs difference and cosine of y against r (same length).
std::pair<double, double> Compare(const std::vector<double>& y, const std::vector<double>& r) {
  double max_diff = 0, dot = 0, ny = 0, nr = 0;
  for (size_t j = 0; j < y.size(); ++j) {
    max_diff = std::max(max_diff, std::fabs(y[j] - r[j]));
    dot += y[j] * r[j];
    ny += y[j] * y[j];
    nr += r[j] * r[j];
  }
  const double cosine = (ny > 0 && nr > 0) ? dot / std::sqrt(ny * nr) : (max_diff == 0 ? 1.0 : 0.0);
  return {max_diff, cosine};
}

// One zeroed float buffer of `positions` positions per `past.i.*` input ([1, kv heads,
// positions, head dim]), bound as both that input and its `present.i.*` output, so that ONNX
// Runtime writes each call's new keys and values into it in place. `caches` owns the buffers
// and must outlive the binding.
void BindCaches(Ort::Session& session, Ort::IoBinding& binding, const Ort::MemoryInfo& cpu,
                int64_t positions, std::vector<std::vector<float>>& caches) {
  Ort::AllocatorWithDefaultOptions allocator;
  for (size_t i = 0; i < session.GetInputCount(); ++i) {
    const std::string name = session.GetInputNameAllocated(i, allocator).get();
    if (name.rfind("past.", 0) != 0) continue;
    Ort::TypeInfo type_info = session.GetInputTypeInfo(i);
    const std::vector<int64_t> shape = type_info.GetTensorTypeAndShapeInfo().GetShape();
    const std::vector<int64_t> dims = {1, shape[1], positions, shape[3]};
    caches.emplace_back(static_cast<size_t>(Count(dims)), 0.0f);
    Ort::Value cache = Ort::Value::CreateTensor<float>(cpu, caches.back().data(),
                                                       caches.back().size(), dims.data(), 4);
    binding.BindInput(name.c_str(), cache);
    binding.BindOutput(("present." + name.substr(5)).c_str(), cache);
  }
}

// The generation loop of a KV-cache decoder (docs/format.md) over row 0 of `ids` [B, T]: the
// first T/2 tokens as the prompt, then one token per call. The cache is one buffer of T
// positions per past input, bound with an IoBinding as both `past.i.*` and `present.i.*`, so
// ONNX Runtime writes each call's new keys and values into it in place; attention_mask
// (ones, one per token so far) tells it how much is filled. Each call returns the last
// token's logits; they are compared with the reference `logits` [B, T, V] at positions
// T/2-1 .. T-1. Returns whether the cosine reaches kMinCosine.
bool RunKvCache(Ort::Env& env, const Ort::SessionOptions& options, const std::string& path,
                const HostTensor& ids, const HostTensor& logits) {
  if (ids.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 || ids.dims.size() != 2 ||
      logits.dims.size() != 3 || logits.dims[1] != ids.dims[1])
    throw std::runtime_error("reference.bin: input_ids [B, T] int64 and logits [B, T, V] wanted");
  Ort::Session session(env, path.c_str(), options);
  Ort::MemoryInfo cpu = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
  const int64_t t = ids.dims[1], prompt = t / 2, vocab = logits.dims[2];
  std::vector<std::vector<float>> caches;  // outlives the binding that points into it
  Ort::IoBinding binding(session);
  binding.BindOutput("logits", cpu);  // first: GetOutputValues() lists the outputs as bound
  BindCaches(session, binding, cpu, t, caches);
  const int64_t* row = reinterpret_cast<const int64_t*>(ids.bytes.data());
  std::vector<double> got, want;
  for (int64_t start = 0, stop = prompt; stop <= t; start = stop, ++stop) {
    std::vector<int64_t> step(row + start, row + stop), mask(static_cast<size_t>(stop), 1);
    const int64_t step_dims[2] = {1, stop - start}, mask_dims[2] = {1, stop};
    binding.BindInput("input_ids", Ort::Value::CreateTensor<int64_t>(cpu, step.data(), step.size(),
                                                                     step_dims, 2));
    binding.BindInput("attention_mask", Ort::Value::CreateTensor<int64_t>(cpu, mask.data(),
                                                                          mask.size(), mask_dims, 2));
    session.Run(Ort::RunOptions{nullptr}, binding);
    std::vector<Ort::Value> out = binding.GetOutputValues();
    const std::vector<double> y = ToDoubles(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
                                            out[0].GetTensorRawData(), vocab);
    got.insert(got.end(), y.begin(), y.end());
    const std::vector<double> r = ToDoubles(logits.type, logits.bytes.data() +
                                            (stop - 1) * vocab * ElementSize(logits.type), vocab);
    want.insert(want.end(), r.begin(), r.end());
  }
  const auto [max_diff, cosine] = Compare(got, want);
  std::printf("KV cache (%s): %lld-token prompt, then %lld tokens one by one, cache updated in "
              "place: max_abs_diff %.3e cosine %.8f\n", path.c_str(), static_cast<long long>(prompt),
              static_cast<long long>(t - prompt), max_diff, cosine);
  return cosine >= kMinCosine;
}

// prompt.bin (write_prompt.py has the format): the prompt, its ids, the stop ids and the
// bytes of every token id.
struct Prompt {
  std::string text;
  std::vector<int64_t> ids, stop;
  std::vector<std::string> pieces;
};

Prompt ReadPrompt(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in)
    throw std::runtime_error("no " + path + ": write it with samples/02_cpp_ort/write_prompt.py "
                             "OUT_DIR --prompt TEXT");
  char magic[8];
  if (!in.read(magic, 8) || std::memcmp(magic, kPromptMagic, 8) != 0)
    throw std::runtime_error(path + ": not a prompt.bin (bad magic)");
  constexpr uint32_t kMaxCount = 1u << 24;  // a sanity bound on every count in the file
  auto string = [&]() {
    const uint32_t n = ReadPod<uint32_t>(in, "prompt.bin");
    if (n > kMaxCount) throw std::runtime_error(path + ": corrupt string length");
    std::string s(n, '\0');
    if (n && !in.read(&s[0], n)) throw std::runtime_error(path + ": truncated");
    return s;
  };
  auto ids = [&]() {
    const uint32_t n = ReadPod<uint32_t>(in, "prompt.bin");
    if (n > kMaxCount) throw std::runtime_error(path + ": corrupt id count");
    std::vector<int64_t> v(n);
    for (int64_t& id : v) id = ReadPod<int64_t>(in, "prompt.bin");
    return v;
  };
  Prompt p;
  p.text = string();
  p.ids = ids();
  p.stop = ids();
  const uint32_t vocab = ReadPod<uint32_t>(in, "prompt.bin");
  if (vocab > kMaxCount) throw std::runtime_error(path + ": corrupt vocabulary size");
  for (uint32_t i = 0; i < vocab; ++i) p.pieces.push_back(string());
  if (p.ids.empty()) throw std::runtime_error(path + ": the prompt has no tokens");
  for (int64_t id : p.ids)
    if (id < 0 || id >= static_cast<int64_t>(vocab))
      throw std::runtime_error(path + ": prompt id " + std::to_string(id) + " outside the vocabulary");
  return p;
}

// Greedy generation through a KV-cache decoder, as RunKvCache but feeding back the most likely
// token: the cache holds prompt + max_new positions, filled in place; stops at a stop id or
// after max_new tokens. Prints the prompt, then each token's bytes as it comes, then the ids
// and the timings (time to the first new token, which includes the prompt, and tokens/s after).
void Generate(Ort::Env& env, const Ort::SessionOptions& options, const std::string& path,
              const Prompt& prompt, int64_t max_new) {
  using Clock = std::chrono::steady_clock;
  Ort::Session session(env, path.c_str(), options);
  Ort::MemoryInfo cpu = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
  const int64_t total = static_cast<int64_t>(prompt.ids.size()) + max_new;
  std::vector<std::vector<float>> caches;
  Ort::IoBinding binding(session);
  binding.BindOutput("logits", cpu);
  BindCaches(session, binding, cpu, total, caches);
  std::fputs(prompt.text.c_str(), stdout);
  std::fflush(stdout);
  std::vector<int64_t> step = prompt.ids, generated;
  const auto start = Clock::now();
  double first_ms = 0;
  for (int64_t length = static_cast<int64_t>(step.size());; ++length) {
    std::vector<int64_t> mask(static_cast<size_t>(length), 1);
    const int64_t step_dims[2] = {1, static_cast<int64_t>(step.size())}, mask_dims[2] = {1, length};
    binding.BindInput("input_ids", Ort::Value::CreateTensor<int64_t>(cpu, step.data(), step.size(),
                                                                     step_dims, 2));
    binding.BindInput("attention_mask", Ort::Value::CreateTensor<int64_t>(cpu, mask.data(),
                                                                          mask.size(), mask_dims, 2));
    session.Run(Ort::RunOptions{nullptr}, binding);
    std::vector<Ort::Value> out = binding.GetOutputValues();
    const std::vector<int64_t> dims = out[0].GetTensorTypeAndShapeInfo().GetShape();
    const int64_t vocab = dims.back();
    const float* logits = out[0].GetTensorData<float>() + (Count(dims) - vocab);  // last row
    const int64_t token = std::max_element(logits, logits + vocab) - logits;
    if (generated.empty())
      first_ms = std::chrono::duration<double, std::milli>(Clock::now() - start).count();
    generated.push_back(token);
    if (token < static_cast<int64_t>(prompt.pieces.size()))
      std::fputs(prompt.pieces[static_cast<size_t>(token)].c_str(), stdout);
    std::fflush(stdout);
    const bool stop = std::find(prompt.stop.begin(), prompt.stop.end(), token) != prompt.stop.end();
    if (stop || static_cast<int64_t>(generated.size()) >= max_new) break;
    step.assign(1, token);
  }
  const double all_ms = std::chrono::duration<double, std::milli>(Clock::now() - start).count();
  std::printf("\ngenerated ids:");
  for (int64_t id : generated) std::printf(" %lld", static_cast<long long>(id));
  const size_t rest = generated.size() - 1;
  std::printf("\n%zu new tokens; time to first token %.1f ms for %zu prompt tokens; ",
              generated.size(), first_ms, prompt.ids.size());
  if (rest) std::printf("%.1f tokens/s after it\n", 1e3 * static_cast<double>(rest) / (all_ms - first_ms));
  else std::printf("no tokens after it\n");
}

// One session shared by `threads` threads from its very first run (where the op library packs
// its weights), each running kConcurrentRuns inferences on its own pseudo-random inputs of
// varying batch and sequence length; every output must equal, byte for byte, the same inputs
// run one after the other on a second session. Ort::Session::Run is thread-safe: this is how
// a server shares one model between its request threads. Prints the counts; false on a
// difference.
constexpr int kConcurrentRuns = 50;

bool RunConcurrent(Ort::Env& env, const Ort::SessionOptions& options, const std::string& model,
                   int64_t vocab, int threads) {
  Ort::Session shared(env, model.c_str(), options), alone(env, model.c_str(), options);
  Ort::AllocatorWithDefaultOptions allocator;
  std::vector<std::string> in_names, out_names;
  std::vector<std::pair<ONNXTensorElementDataType, std::vector<int64_t>>> in_types;
  for (size_t i = 0; i < shared.GetInputCount(); ++i) {
    in_names.push_back(shared.GetInputNameAllocated(i, allocator).get());
    Ort::TypeInfo type_info = shared.GetInputTypeInfo(i);
    auto info = type_info.GetTensorTypeAndShapeInfo();
    in_types.emplace_back(info.GetElementType(), info.GetShape());
  }
  for (size_t i = 0; i < shared.GetOutputCount(); ++i)
    out_names.push_back(shared.GetOutputNameAllocated(i, allocator).get());
  std::vector<const char*> in_c, out_c;
  for (auto& n : in_names) in_c.push_back(n.c_str());
  for (auto& n : out_names) out_c.push_back(n.c_str());
  // inputs[t][r]: thread t's r-th run; outputs as raw bytes
  std::vector<std::vector<std::vector<HostTensor>>> inputs(static_cast<size_t>(threads));
  for (int t = 0; t < threads; ++t) {
    std::mt19937_64 rng(1000 + static_cast<uint64_t>(t));
    for (int r = 0; r < kConcurrentRuns; ++r) {
      const int64_t batch = 1 + (r + t) % 2, seq = 1 + (7 * r + 3 * t) % 16;
      std::vector<HostTensor> feeds;
      for (auto& [type, shape] : in_types) feeds.push_back(MakeInput(type, shape, vocab, batch, seq, rng));
      inputs[static_cast<size_t>(t)].push_back(std::move(feeds));
    }
  }
  Ort::MemoryInfo cpu = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
  auto run = [&](Ort::Session& session, std::vector<HostTensor>& feeds) {
    std::vector<Ort::Value> values;
    for (HostTensor& h : feeds)
      values.push_back(Ort::Value::CreateTensor(cpu, h.bytes.data(), h.bytes.size(), h.dims.data(),
                                                h.dims.size(), h.type));
    std::vector<Ort::Value> out = session.Run(Ort::RunOptions{nullptr}, in_c.data(), values.data(),
                                              values.size(), out_c.data(), out_c.size());
    std::vector<std::vector<uint8_t>> bytes;
    for (Ort::Value& v : out) {
      auto info = v.GetTensorTypeAndShapeInfo();
      const auto* p = static_cast<const uint8_t*>(v.GetTensorRawData());
      bytes.emplace_back(p, p + info.GetElementCount() * ElementSize(info.GetElementType()));
    }
    return bytes;
  };
  std::vector<std::vector<std::vector<std::vector<uint8_t>>>> results(static_cast<size_t>(threads));
  std::vector<std::string> errors(static_cast<size_t>(threads));
  std::atomic<int> waiting{threads};
  std::vector<std::thread> pool;
  struct Release {  // if a thread fails to start, the started ones must not wait forever
    std::atomic<int>& waiting;
    std::vector<std::thread>& pool;
    ~Release() {
      waiting.store(0);
      for (std::thread& th : pool)
        if (th.joinable()) th.join();
    }
  } release{waiting, pool};
  for (int t = 0; t < threads; ++t)
    pool.emplace_back([&, t] {
      try {
        waiting.fetch_sub(1);
        while (waiting.load() > 0) std::this_thread::yield();  // all start at once
        for (auto& feeds : inputs[static_cast<size_t>(t)])
          results[static_cast<size_t>(t)].push_back(run(shared, feeds));
      } catch (const std::exception& e) {
        errors[static_cast<size_t>(t)] = e.what();
      }
    });
  for (std::thread& th : pool) th.join();
  int differ = 0;
  for (int t = 0; t < threads; ++t) {
    if (!errors[static_cast<size_t>(t)].empty())
      throw std::runtime_error("thread " + std::to_string(t) + ": " + errors[static_cast<size_t>(t)]);
    for (int r = 0; r < kConcurrentRuns; ++r)
      differ += run(alone, inputs[static_cast<size_t>(t)][static_cast<size_t>(r)]) !=
                results[static_cast<size_t>(t)][static_cast<size_t>(r)];
  }
  std::printf("concurrency: %d threads x %d runs on one session: %d of %d outputs differ from "
              "the sequential run\n", threads, kConcurrentRuns, differ, threads * kConcurrentRuns);
  return differ == 0;
}

int Run(int argc, char** argv) {
  std::string folder, lib;
  int threads = 0;
  int64_t batch = 1, seq = 16, generate = 0;
  int concurrency = 0;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw std::runtime_error(a + " needs a value");
      return argv[++i];
    };
    if (a == "--lib") lib = value();
    else if (a == "--threads") threads = std::stoi(value());
    else if (a == "--batch") batch = std::stoll(value());
    else if (a == "--seq") seq = std::stoll(value());
    else if (a == "--generate") generate = std::stoll(value());
    else if (a == "--concurrency") concurrency = std::stoi(value());
    else if (a == "-h" || a == "--help") {
      std::printf("usage: qexport_sample OUT_DIR [--lib PATH] [--threads N] [--batch B] [--seq S]\n"
                  "       qexport_sample OUT_DIR --generate N [--lib PATH] [--threads N]\n"
                  "       qexport_sample OUT_DIR --concurrency T [--lib PATH] [--threads N]\n");
      return 0;
    } else if (folder.empty()) folder = a;
    else throw std::runtime_error("unexpected argument " + a);
  }
  if (folder.empty()) throw std::runtime_error("usage: qexport_sample OUT_DIR [--lib PATH] ...");
  const std::string model = folder + "/model.onnx";
  if (!FileExists(model)) throw std::runtime_error(model + " does not exist");
  if (lib.empty()) lib = folder + "/libqexport_ops.so";
  if (!FileExists(lib)) {
    const char* env = std::getenv("QEXPORT_OPS_LIBRARY");
    if (!env) throw std::runtime_error("no " + lib + ": pass --lib or set QEXPORT_OPS_LIBRARY");
    lib = env;
  }

  Ort::Env env(ORT_LOGGING_LEVEL_WARNING, "qexport_sample");
  Ort::SessionOptions options;
  if (threads > 0) options.SetIntraOpNumThreads(threads);
  options.RegisterCustomOpsLibrary(lib.c_str());
  if (generate != 0) {
    const std::string with_past = folder + "/model_with_past.onnx";
    if (generate < 0) throw std::runtime_error("--generate takes a positive token count");
    if (!FileExists(with_past))
      throw std::runtime_error("no " + with_past + ": export a causal LM with qexport (it writes "
                               "one where the model family has one)");
    Generate(env, options, with_past, ReadPrompt(folder + "/prompt.bin"), generate);
    return 0;
  }
  Ort::Session session(env, model.c_str(), options);
  std::printf("model %s with %s\n", model.c_str(), lib.c_str());

  Ort::AllocatorWithDefaultOptions allocator;
  int64_t vocab = 100;
  {
    Ort::ModelMetadata meta = session.GetModelMetadata();
    Ort::AllocatedStringPtr v = meta.LookupCustomMetadataMapAllocated("qexport.vocab_size", allocator);
    if (v) vocab = std::stoll(v.get());
  }
  if (concurrency != 0) {
    if (concurrency < 1) throw std::runtime_error("--concurrency takes a positive thread count");
    return RunConcurrent(env, options, model, vocab, concurrency) ? 0 : 1;
  }

  const std::map<std::string, HostTensor> reference = ReadReference(folder + "/reference.bin");
  std::mt19937_64 rng(0);
  std::vector<std::string> in_names, out_names;
  std::vector<HostTensor> inputs;
  for (size_t i = 0; i < session.GetInputCount(); ++i) {
    in_names.push_back(session.GetInputNameAllocated(i, allocator).get());
    Ort::TypeInfo type_info = session.GetInputTypeInfo(i);  // owns what `info` points into
    auto info = type_info.GetTensorTypeAndShapeInfo();
    auto it = reference.find(in_names.back());
    inputs.push_back(it != reference.end()
                         ? it->second
                         : MakeInput(info.GetElementType(), info.GetShape(), vocab, batch, seq, rng));
    std::printf("input %s: shape %s\n", in_names.back().c_str(), ShapeString(inputs.back().dims).c_str());
  }
  for (size_t i = 0; i < session.GetOutputCount(); ++i)
    out_names.push_back(session.GetOutputNameAllocated(i, allocator).get());

  Ort::MemoryInfo cpu = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
  std::vector<Ort::Value> feeds;
  for (HostTensor& t : inputs)
    feeds.push_back(Ort::Value::CreateTensor(cpu, t.bytes.data(), t.bytes.size(), t.dims.data(),
                                             t.dims.size(), t.type));
  std::vector<const char*> in_c, out_c;
  for (auto& n : in_names) in_c.push_back(n.c_str());
  for (auto& n : out_names) out_c.push_back(n.c_str());
  std::vector<Ort::Value> outputs =
      session.Run(Ort::RunOptions{nullptr}, in_c.data(), feeds.data(), feeds.size(), out_c.data(), out_c.size());

  bool ok = true;
  for (size_t i = 0; i < outputs.size(); ++i) {
    auto info = outputs[i].GetTensorTypeAndShapeInfo();
    const std::vector<int64_t> dims = info.GetShape();
    const std::vector<double> y = ToDoubles(info.GetElementType(), outputs[i].GetTensorRawData(), Count(dims));
    double checksum = 0;
    for (double v : y) checksum += v;
    std::printf("output %s: shape %s checksum %.6e\n", out_names[i].c_str(), ShapeString(dims).c_str(), checksum);
    auto it = reference.find(out_names[i]);
    if (it == reference.end()) continue;
    if (it->second.dims != dims) {
      std::printf("reference %s: shape %s differs\n", out_names[i].c_str(), ShapeString(it->second.dims).c_str());
      ok = false;
      continue;
    }
    const std::vector<double> r = ToDoubles(it->second.type, it->second.bytes.data(), Count(dims));
    const auto [max_diff, cosine] = Compare(y, r);
    std::printf("reference %s: max_abs_diff %.3e cosine %.8f\n", out_names[i].c_str(), max_diff, cosine);
    ok = ok && cosine >= kMinCosine;
  }
  const std::string with_past = folder + "/model_with_past.onnx";
  const auto ids = reference.find("input_ids"), logits = reference.find("logits");
  if (FileExists(with_past) && ids != reference.end() && logits != reference.end())
    ok = RunKvCache(env, options, with_past, ids->second, logits->second) && ok;
  if (reference.empty()) std::printf("no reference.bin: outputs not checked\n");
  std::printf(ok ? "OK\n" : "FAIL: cosine below 0.999\n");
  return ok ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return Run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "qexport_sample: error: %s\n", e.what());
    return 2;
  }
}
