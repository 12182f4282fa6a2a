// qexport::BinaryMixedLinear CPU kernel: which code serves a call (docs/kernels.md).
// - ISA path: the best the CPU has (AVX-512 F/BW/VL/VBMI/VNNI, else AVX2 + FMA, else
//   portable; CPU features from plugins/common/qexport_cpu_features.h), or the one
//   QEXPORT_CPU_ISA forces (ResolveIsa), fixed per kernel by the glue.
// - Algorithm: lookup tables (bml_cpu_lut.cpp), or for large M dequantized panels + GEMM
//   (bml_cpu_gemm.cpp) where the path's cost model (UseGemm, constants per path in
//   bml_cpu_kernels_*.cpp) predicts it faster, or the one QEXPORT_CPU_ALGO forces.
// - Inputs or parameters that are not finite go to the plain kernel (RunCpuPlain,
//   bml_cpu.cpp), where no reordering can turn an infinity into NaN.
#include <cstdlib>
#include <string>

#include "binary_mixed_linear/bml_cpu_internal.h"
#include "qexport_cpu_features.h"

namespace qexport {
namespace bml {
namespace {

bool CpuHasIsa(Isa isa) {
  switch (isa) {
    case Isa::kAvx2:
      return CpuHasAll({CpuFeature::kAvx2, CpuFeature::kFma});
    case Isa::kAvx512:
      return CpuHasAll({CpuFeature::kAvx512f, CpuFeature::kAvx512bw, CpuFeature::kAvx512vl,
                        CpuFeature::kAvx512vbmi, CpuFeature::kAvx512vnni, CpuFeature::kFma});
    default:
      return true;
  }
}

const CpuKernels* Kernels(Isa isa) {
  switch (isa) {
    case Isa::kAvx2: return detail::KernelsAvx2();
    case Isa::kAvx512: return detail::KernelsAvx512();
    default: return &detail::KernelsPortable();
  }
}

// Whether the dequantize + GEMM path serves this call: by the path's cost model
// (detail::GemmCosts) unless QEXPORT_CPU_ALGO forces a choice.
bool UseGemm(const CpuKernels& kern, Algo algo, const PackedWeights& p, int64_t m) {
  if (!kern.gemm || algo == Algo::kTables) return false;
  if (algo == Algo::kGemm) return true;
  const detail::GemmCosts& c = kern.gemm_costs;
  if (m < c.min_rows) return false;
  const double rows = static_cast<double>(m), blocks = static_cast<double>(p.nblk);
  const double k = static_cast<double>(p.k), kb = static_cast<double>(p.kb);
  const double s = static_cast<double>(p.s);
  const double fields = static_cast<double>(kNibbles * (p.kb_dw + p.s_dw));
  const double gemm = (rows + c.dequant) * blocks * k;
  const double tables = rows * (c.build_binary * kb + c.build_salient * s +
                                blocks * (c.lookup * fields + c.epilogue));
  return gemm < tables;
}

template <typename T>
Status Run(const Args& a, const PackedWeights& p, const CpuKernels& kern, Algo algo,
           const ParallelFor& par) {
  return UseGemm(kern, algo, p, a.m) ? RunGemm<T>(a, p, kern, par)
                                     : RunLut<T>(a, p, kern, par);
}

}  // namespace

const char* IsaName(Isa isa) {
  switch (isa) {
    case Isa::kAuto: return "auto";
    case Isa::kPortable: return "portable";
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512: return "avx512";
  }
  return "?";
}

bool IsaSupported(Isa isa) { return Kernels(isa) != nullptr && CpuHasIsa(isa); }

const CpuKernels* KernelsFor(Isa isa) {
  if (isa == Isa::kAuto) isa = BestIsa();
  return IsaSupported(isa) ? Kernels(isa) : nullptr;
}

Isa BestIsa() {
  if (IsaSupported(Isa::kAvx512)) return Isa::kAvx512;
  if (IsaSupported(Isa::kAvx2)) return Isa::kAvx2;
  return Isa::kPortable;
}

Status ResolveIsa(const char* name, Isa* out) {
  const std::string v = name ? name : "";
  Isa isa;
  if (v.empty() || v == "auto") {
    *out = BestIsa();
    return Status::Ok();
  } else if (v == "portable") {
    isa = Isa::kPortable;
  } else if (v == "avx2") {
    isa = Isa::kAvx2;
  } else if (v == "avx512") {
    isa = Isa::kAvx512;
  } else {
    return Status::Error(std::string(kIsaEnv) + "='" + v +
                         "' is not one of auto, portable, avx2, avx512");
  }
  if (!IsaSupported(isa)) {
    std::string have = "portable";
    if (IsaSupported(Isa::kAvx2)) have += ", avx2";
    if (IsaSupported(Isa::kAvx512)) have += ", avx512";
    return Status::Error(std::string(kIsaEnv) + "=" + v + ": this CPU (or build) lacks " +
                         (isa == Isa::kAvx2 ? "AVX2/FMA" : "AVX-512 F/BW/VL") +
                         "; available: " + have);
  }
  *out = isa;
  return Status::Ok();
}

Status IsaFromEnvironment(Isa* out) { return ResolveIsa(std::getenv(kIsaEnv), out); }

Status CpuPathFromEnvironment(CpuPath* out) {
  Status st = IsaFromEnvironment(&out->isa);
  if (!st) return st;
  const char* env = std::getenv(kAlgoEnv);
  const std::string v = env ? env : "";
  if (v.empty() || v == "auto") {
    out->algo = Algo::kAuto;
  } else if (v == "tables") {
    out->algo = Algo::kTables;
  } else if (v == "gemm") {
    out->algo = Algo::kGemm;
  } else {
    return Status::Error(std::string(kAlgoEnv) + "='" + v + "' is not one of auto, tables, gemm");
  }
  return Status::Ok();
}

Status RunCpuPacked(const Args& a, const PackedWeights& p, const CpuPath& path,
                    const ParallelFor& par) noexcept {
  try {
    Status st = CheckSizes(a);
    if (!st) return st;
    if (a.k != p.k || a.n != p.n || a.s != p.s || a.group_size != p.group_size)
      return Status::Error("packed weights were built for other sizes");
    if (a.m == 0 || a.n == 0) return Status::Ok();
    if (!a.x || !a.y) return Status::Error("a required input pointer is null");
    const CpuKernels* found = KernelsFor(path.isa);
    if (!found)
      return Status::Error(std::string("CPU path ") + IsaName(path.isa) +
                           " is not available here");
    const CpuKernels& kern = *found;
    if (p.byte_major != kern.byte_major)
      return Status::Error("packed weights were built for another CPU path");
    if (!p.finite || !kern.all_finite(a.x, a.m * a.k, a.act == ActType::kFloat16))
      return RunCpuPlain(a);
    return a.act == ActType::kFloat32 ? Run<float>(a, p, kern, path.algo, par)
                                      : Run<uint16_t>(a, p, kern, path.algo, par);
  } catch (...) {
    return Status::Error(ExceptionMessage());
  }
}

Status RunCpu(const Args& a) noexcept {
  Status st = CheckSizes(a);
  if (!st) return st;
  if (a.m == 0 || a.n == 0) return Status::Ok();
  CpuPath path;
  st = CpuPathFromEnvironment(&path);
  if (!st) return st;
  PackedPtr packed;
  st = PackWeights(a, &packed, /*release_source=*/false, path.isa);
  if (!st) return st;
  return RunCpuPacked(a, *packed, path, ParallelFor{});
}

}  // namespace bml
}  // namespace qexport
