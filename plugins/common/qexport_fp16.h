// IEEE 754 binary16 (fp16) <-> binary32 on the host, for kernels that take fp16 tensors as raw
// uint16_t bits. (Device code and the code shared with it use their own __host__ __device__
// helpers: plugins/binary_mixed_linear/bml_unpack.h.)
#pragma once

#include <cstdint>

namespace qexport {

// Round to nearest even; NaN (payload kept) and infinities kept.
float HalfToFloat(uint16_t h);
uint16_t FloatToHalf(float f);

// Whether the fp16 bits are a finite value (not an infinity or NaN).
inline bool HalfIsFinite(uint16_t h) { return (h & 0x7c00u) != 0x7c00u; }

}  // namespace qexport
