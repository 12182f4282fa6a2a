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
// (KernelContext_ParallelFor, qexport::ort::OrtThreadPool), so the session's
// intra_op_num_threads governs it.
//
// AddBinaryMixedLinearOps, called by plugins/common/ort_register.cpp, also adds the CUDA
// execution provider variants (ort_cuda_op.cpp) when the library is built with
// QEXPORT_BUILD_CUDA (QEXPORT_WITH_CUDA, defined by this folder's CMakeLists.txt).
#include "binary_mixed_linear/ort_op.h"

#include <array>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "binary_mixed_linear/bml_contract.h"
#include "binary_mixed_linear/bml_cpu.h"
#include "binary_mixed_linear/ort_op_base.h"
#ifdef QEXPORT_WITH_CUDA
#include "binary_mixed_linear/ort_cuda_op.h"
#endif
#include "qexport_ort.h"

namespace qexport {
namespace bml {
namespace ort {
namespace {

struct BmlKernel : KernelBase<BmlKernel> {
  BmlKernel(const OrtApi& api, Node node, CpuPath path, std::vector<bool> constant)
      : KernelBase(api, std::move(node)), path_(path), constant_(std::move(constant)) {}

  // Returns an error message, empty on success.
  std::string Compute(OrtKernelContext* ctx, const std::vector<TensorView>& in) {
    std::string err;
    Args args;
    // Cached packed weights: their contents (salient_idx, zero points) were validated on the
    // call that built them, so only shapes and dtypes are checked again.
    PackedPtr packed = CachedPacked(in);
    if (!(err = ValidateInputs(node_, in, &args, /*check_contents=*/!packed)).empty())
      return err;
    if (!(err = AllocateOutput(api_, ctx, node_, in[kInX], &args.y)).empty())
      return err;
    if (args.m == 0 || args.n == 0) return std::string();
    if (!packed && !(err = Packed(in, args, &packed)).empty()) return err;
    ::qexport::ort::OrtThreadPool pool(api_, ctx);
    Status st = RunCpuPacked(args, *packed, path_, pool.parallel_for());
    return st ? std::string() : st.message;
  }

 private:
  // Whether every present weight input is a constant initializer; *key: their data pointers.
  using Key = std::array<const void*, kNumInputs - 1>;
  bool Cacheable(const std::vector<TensorView>& in, Key* key) const {
    bool cacheable = true;
    for (int i = 1; i < kNumInputs; ++i) {
      (*key)[i - 1] = in[i].present ? in[i].data : nullptr;
      if (in[i].present && !constant_[i]) cacheable = false;
    }
    return cacheable;
  }

  // The cached packed weights for these inputs, or null.
  PackedPtr CachedPacked(const std::vector<TensorView>& in) {
    Key key;
    if (!Cacheable(in, &key)) return nullptr;
    std::lock_guard<std::mutex> lock(cache_mutex_);
    return cache_ && cache_key_ == key ? cache_ : nullptr;
  }

  // The packed weights: cached when every present weight input is a constant initializer
  // (keyed on their data pointers, which stay put for the session's life), else built now.
  // Constant inputs are read only here, so once packed their pages are handed back to the
  // OS (bml::PackWeights' release_source: a hint; see docs/kernels.md).
  std::string Packed(const std::vector<TensorView>& in, const Args& args, PackedPtr* out) {
    Key key;
    const bool cacheable = Cacheable(in, &key);
    Status st = PackWeights(args, out, /*release_source=*/cacheable, path_.isa);
    if (!st) return st.message;
    if (cacheable) {
      std::lock_guard<std::mutex> lock(cache_mutex_);
      cache_ = *out;
      cache_key_ = key;
    }
    return std::string();
  }

  CpuPath path_;
  std::vector<bool> constant_;  // per input: a constant initializer
  std::mutex cache_mutex_;
  PackedPtr cache_;
  Key cache_key_{};
};

struct BmlOp : OpBase<BmlOp, BmlKernel> {
  explicit BmlOp(ONNXTensorElementDataType act) : OpBase(act, "CPUExecutionProvider", "") {}

  // The ISA path and algorithm choice are fixed here, for the kernel's life.
  static std::string MakeKernel(const OrtApi& api, const OrtKernelInfo* info, const Node& node,
                                BmlKernel** kernel) {
    CpuPath path;
    Status st = CpuPathFromEnvironment(&path);
    if (!st) return st.message;
    *kernel = new BmlKernel(api, node, path,
                            ::qexport::ort::ConstantInputs(api, info, kNumInputs));
    return std::string();
  }
};

}  // namespace
}  // namespace ort
}  // namespace bml

void AddBinaryMixedLinearOps(Ort::CustomOpDomain& domain) {
  bml::ort::AddOps<bml::ort::BmlOp>(domain);
#ifdef QEXPORT_WITH_CUDA
  AddBinaryMixedLinearCudaOps(domain);  // same op, CUDAExecutionProvider
#endif
}

}  // namespace qexport
