// ONNX Runtime glue of qexport::BinaryMixedLinear (CPU execution provider).
//
// X and Y are typed (one op object for float, one for float16); the weight inputs are declared
// with an undefined element type so that a wrong dtype reaches bml::ValidateInputs and comes
// back as a message naming the input, instead of a generic schema error. Attributes are read
// and checked once at kernel creation; inputs are checked on every call (cheap next to the
// product). All entry points are noexcept and report failures as OrtStatus.
//
// CPU speed (docs/kernels.md): the ISA path is chosen at kernel creation (QEXPORT_CPU_ISA
// forces one; a path the CPU lacks fails the session with a message; QEXPORT_CPU_ALGO forces
// the tables or the large-M GEMM); the weights are
// packed for the table kernel once and cached when every weight input is a constant
// initializer (else packed on every call); the work is spread with ORT's intra-op thread pool
// (KernelContext_ParallelFor), so the session's intra_op_num_threads governs it.
#include "binary_mixed_linear/ort_op.h"

#include <array>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "binary_mixed_linear/bml_cpu.h"
#include "binary_mixed_linear/ort_common.h"
#include "qexport_contract.h"

namespace qexport {
namespace {

using bml_ort::TakeError;

// ParallelFor callback of the launcher over the kernel context's thread pool.
struct OrtPool {
  const OrtApi* api;
  OrtKernelContext* ctx;
};

void OrtParallelFor(void* pool, void (*task)(void*, size_t), size_t total, void* data) {
  OrtPool* p = static_cast<OrtPool*>(pool);
  OrtStatus* status = p->api->KernelContext_ParallelFor(p->ctx, task, total, 0, data);
  if (status) {
    // No pool to run on: run serially (tasks write disjoint outputs and may be rerun).
    p->api->ReleaseStatus(status);
    for (size_t i = 0; i < total; ++i) task(data, i);
  }
}

struct BmlKernel : bml_ort::KernelBase<BmlKernel> {
  BmlKernel(const OrtApi& api, bml_ort::Node node, bml::CpuPath path, std::vector<bool> constant)
      : KernelBase(api, std::move(node)), path_(path), constant_(std::move(constant)) {}

  // Returns an error message, empty on success.
  std::string Compute(OrtKernelContext* ctx, const std::vector<bml::TensorView>& in) {
    std::string err;
    bml::Args args;
    // Cached packed weights: their contents (salient_idx, zero points) were validated on the
    // call that built them, so only shapes and dtypes are checked again.
    bml::PackedPtr packed = CachedPacked(in);
    if (!(err = bml_ort::ValidateInputs(node_, in, &args, /*check_contents=*/!packed)).empty())
      return err;
    if (!(err = bml_ort::AllocateOutput(api_, ctx, node_, in[kInX], &args.y)).empty())
      return err;
    if (args.m == 0 || args.n == 0) return std::string();
    if (!packed && !(err = Packed(in, args, &packed)).empty()) return err;
    OrtPool pool{&api_, ctx};
    bml::ParallelFor par;
    par.run = &OrtParallelFor;
    par.pool = &pool;
    Status st = bml::RunCpuPacked(args, *packed, path_, par);
    return st ? std::string() : st.message;
  }

 private:
  // Whether every present weight input is a constant initializer; *key: their data pointers.
  using Key = std::array<const void*, kNumInputs - 1>;
  bool Cacheable(const std::vector<bml::TensorView>& in, Key* key) const {
    bool cacheable = true;
    for (int i = 1; i < kNumInputs; ++i) {
      (*key)[i - 1] = in[i].present ? in[i].data : nullptr;
      if (in[i].present && !constant_[i]) cacheable = false;
    }
    return cacheable;
  }

  // The cached packed weights for these inputs, or null.
  bml::PackedPtr CachedPacked(const std::vector<bml::TensorView>& in) {
    Key key;
    if (!Cacheable(in, &key)) return nullptr;
    std::lock_guard<std::mutex> lock(cache_mutex_);
    return cache_ && cache_key_ == key ? cache_ : nullptr;
  }

  // The packed weights: cached when every present weight input is a constant initializer
  // (keyed on their data pointers, which stay put for the session's life), else built now.
  // Constant inputs are read only here, so once packed their pages are handed back to the
  // OS (bml::PackWeights' release_source: a hint; see docs/kernels.md).
  std::string Packed(const std::vector<bml::TensorView>& in, const bml::Args& args,
                     bml::PackedPtr* out) {
    Key key;
    const bool cacheable = Cacheable(in, &key);
    Status st = bml::PackWeights(args, out, /*release_source=*/cacheable);
    if (!st) return st.message;
    if (cacheable) {
      std::lock_guard<std::mutex> lock(cache_mutex_);
      cache_ = *out;
      cache_key_ = key;
    }
    return std::string();
  }

  bml::CpuPath path_;
  std::vector<bool> constant_;  // per input: a constant initializer
  std::mutex cache_mutex_;
  bml::PackedPtr cache_;
  Key cache_key_{};
};

// Per input: whether it is a constant initializer (X, input 0, never counts).
std::vector<bool> ConstantInputs(const OrtApi& api, const OrtKernelInfo* info) {
  std::vector<bool> constant(kNumInputs, false);
  size_t input_count = 0;
  if (TakeError(api, api.KernelInfo_GetInputCount(info, &input_count)).empty()) {
    for (size_t i = 1; i < input_count && i < constant.size(); ++i) {
      int is_constant = 0;
      const OrtValue* value = nullptr;
      if (TakeError(api, api.KernelInfoGetConstantInput_tensor(info, i, &is_constant, &value))
              .empty())
        constant[i] = is_constant != 0 && value != nullptr;
    }
  }
  return constant;
}

struct BmlOp : bml_ort::OpBase<BmlOp, BmlKernel> {
  explicit BmlOp(ONNXTensorElementDataType act) : OpBase(act, "CPUExecutionProvider", "") {}

  // The ISA path and algorithm choice are fixed here, for the kernel's life.
  static std::string MakeKernel(const OrtApi& api, const OrtKernelInfo* info,
                                const bml_ort::Node& node, BmlKernel** kernel) {
    bml::CpuPath path;
    Status st = bml::CpuPathFromEnvironment(&path);
    if (!st) return st.message;
    *kernel = new BmlKernel(api, node, path, ConstantInputs(api, info));
    return std::string();
  }
};

}  // namespace

void AddBinaryMixedLinearOps(Ort::CustomOpDomain& domain) { bml_ort::AddOps<BmlOp>(domain); }

}  // namespace qexport
