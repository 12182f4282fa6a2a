// Which x86 instruction-set extensions the running CPU has (CPUID through
// __builtin_cpu_supports). Ops compile their vector paths with their own -m flags and call
// them only after asking here; their dispatch tables live in their own folders
// (e.g. plugins/binary_mixed_linear/bml_cpu_dispatch.cpp).
#pragma once

#include <initializer_list>

namespace qexport {

enum class CpuFeature { kAvx2, kFma, kAvx512f, kAvx512bw, kAvx512vl, kAvx512vbmi, kAvx512vnni };

// Whether the CPU has the feature; false for every feature on a non-x86 build.
bool CpuHas(CpuFeature feature);

// Whether the CPU has all of them.
bool CpuHasAll(std::initializer_list<CpuFeature> features);

}  // namespace qexport
