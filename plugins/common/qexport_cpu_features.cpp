// CPU feature detection (qexport_cpu_features.h): CPUID once, through
// __builtin_cpu_supports, then a bit mask.
#include "qexport_cpu_features.h"

namespace qexport {
namespace {

unsigned Bit(CpuFeature f) { return 1u << static_cast<unsigned>(f); }

unsigned Detect() {
  unsigned mask = 0;
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2")) mask |= Bit(CpuFeature::kAvx2);
  if (__builtin_cpu_supports("fma")) mask |= Bit(CpuFeature::kFma);
  if (__builtin_cpu_supports("avx512f")) mask |= Bit(CpuFeature::kAvx512f);
  if (__builtin_cpu_supports("avx512bw")) mask |= Bit(CpuFeature::kAvx512bw);
  if (__builtin_cpu_supports("avx512vl")) mask |= Bit(CpuFeature::kAvx512vl);
  if (__builtin_cpu_supports("avx512vbmi")) mask |= Bit(CpuFeature::kAvx512vbmi);
  if (__builtin_cpu_supports("avx512vnni")) mask |= Bit(CpuFeature::kAvx512vnni);
#endif
  return mask;
}

unsigned Features() {
  static const unsigned mask = Detect();
  return mask;
}

}  // namespace

bool CpuHas(CpuFeature feature) { return (Features() & Bit(feature)) != 0; }

bool CpuHasAll(std::initializer_list<CpuFeature> features) {
  const unsigned mask = Features();
  for (CpuFeature f : features)
    if ((mask & Bit(f)) == 0) return false;
  return true;
}

}  // namespace qexport
