// ctypes entry points into plugins/binary_mixed_linear/bml_unpack.h (the index/unpack logic the
// CUDA kernels use), compiled with the host compiler by tests/test_gpu_unpack.py and compared
// with the Python reference (qexport/packing.py). No CUDA needed.
#include <cstdint>

#include "binary_mixed_linear/bml_unpack.h"

namespace up = qexport::bml::unpack;

extern "C" {

// out[c] = input channel of binary column c, c < k - s.
void qx_binary_channels(const int32_t* salient_idx, int64_t s, int64_t k, int64_t* out) {
  for (int64_t c = 0; c < k - s; ++c) out[c] = up::BinaryChannel(c, salient_idx, s, k);
}
// out[n * kb + c] = +1 / -1 of sign_packed [n, ceil(kb/8)].
void qx_unpack_signs(const uint8_t* packed, int64_t n, int64_t kb, float* out) {
  const int64_t bytes = up::CeilDiv(kb, 8);
  for (int64_t r = 0; r < n; ++r)
    for (int64_t c = 0; c < kb; ++c) out[r * kb + c] = up::SignValue(packed + r * bytes, c);
}
// out[n * s + j] = code of salient column j.
void qx_unpack_nibbles(const uint8_t* packed, int64_t n, int64_t s, int32_t* out) {
  const int64_t bytes = up::SalientBytes(s);
  for (int64_t r = 0; r < n; ++r)
    for (int64_t j = 0; j < s; ++j) out[r * s + j] = up::Nibble(packed + r * bytes, j);
}
// Group of each salient column, and the group count.
int64_t qx_groups(int64_t s, int64_t group_size, int64_t* group_of) {
  for (int64_t j = 0; j < s; ++j) group_of[j] = up::GroupOf(j, s, group_size);
  return up::NumGroups(s, group_size);
}
// Dequantized salient weights [n, s].
void qx_salient_weights(const uint8_t* packed, const uint16_t* scale, const uint8_t* zero,
                        int64_t n, int64_t s, int64_t group_size, float* out) {
  const int64_t bytes = up::SalientBytes(s), groups = up::NumGroups(s, group_size);
  for (int64_t r = 0; r < n; ++r)
    for (int64_t j = 0; j < s; ++j)
      out[r * s + j] = up::SalientWeight(packed + r * bytes, scale + r * groups,
                                         zero + r * groups, j, s, group_size);
}
void qx_half_to_float(const uint16_t* h, int64_t count, float* out) {
  for (int64_t i = 0; i < count; ++i) out[i] = up::HalfBitsToFloat(h[i]);
}
void qx_float_to_half(const float* f, int64_t count, uint16_t* out) {
  for (int64_t i = 0; i < count; ++i) out[i] = up::FloatToHalfBits(f[i]);
}

}  // extern "C"
