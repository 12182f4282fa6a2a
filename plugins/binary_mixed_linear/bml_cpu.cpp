// qexport::BinaryMixedLinear CPU kernel, plain form: C++ in the reference's order of
// operations, fp32 accumulation (docs/format.md). The fast kernels are bml_cpu_lut.cpp and
// bml_cpu_gemm.cpp (drivers, chosen by bml_cpu_dispatch.cpp) and bml_cpu_kernels_*.cpp
// (per-ISA inner loops); this one serves inputs that are not finite (see RunCpuPlain in
// bml_cpu.h).
//
// Per call: the binary-channel list, the fp16 parameters converted to float. Per row of X:
// gather the binary channels (times r2) into a zero-padded buffer and the salient channels,
// then for every output n one pass over the bytes of its sign row (a 256-entry table maps a
// byte to eight +-1.0f factors) and one pass over its 4-bit codes.
#include "binary_mixed_linear/bml_cpu.h"

#include <algorithm>
#include <array>
#include <cstring>
#include <new>
#include <string>
#include <vector>

#include "qexport_fp16.h"

namespace qexport {
namespace bml {

namespace {

using SignTable = std::array<std::array<float, 8>, 256>;

const SignTable& Signs() {
  static const SignTable table = [] {
    SignTable t{};
    for (int b = 0; b < 256; ++b)
      for (int i = 0; i < 8; ++i) t[b][i] = ((b >> i) & 1) ? 1.0f : -1.0f;
    return t;
  }();
  return table;
}

inline float Load(const float* p, int64_t i) { return p[i]; }
inline float Load(const uint16_t* p, int64_t i) { return HalfToFloat(p[i]); }
inline void Store(float* p, int64_t i, float v) { p[i] = v; }
inline void Store(uint16_t* p, int64_t i, float v) { p[i] = FloatToHalf(v); }

std::vector<float> HalfsToFloats(const uint16_t* p, int64_t count) {
  std::vector<float> out(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i) out[i] = HalfToFloat(p[i]);
  return out;
}

template <typename T>
Status Run(const Args& a) {
  const int64_t m = a.m, k = a.k, n = a.n, s = a.s;
  const int64_t kb = k - s;
  const int64_t groups = NumGroups(s, a.group_size);
  const int64_t gsz = a.group_size > 0 ? a.group_size : s;
  const int64_t sign_bytes = (kb + 7) / 8;
  const int64_t sal_bytes = (s + 1) / 2;

  // Binary channels = the channels not in salient_idx, ascending.
  std::vector<uint8_t> is_salient(static_cast<size_t>(k), 0);
  for (int64_t j = 0; j < s; ++j) {
    const int64_t c = a.salient_idx[j];
    if (c < 0 || c >= k || (j > 0 && c <= a.salient_idx[j - 1]))
      return Status::Error("salient_idx[" + std::to_string(j) + "] = " +
                           std::to_string(c) + " is not strictly increasing within [0, " +
                           std::to_string(k) + ")");
    is_salient[c] = 1;
  }
  std::vector<int64_t> binary_channel;
  binary_channel.reserve(static_cast<size_t>(kb));
  for (int64_t c = 0; c < k; ++c)
    if (!is_salient[c]) binary_channel.push_back(c);

  const std::vector<float> row_scale = HalfsToFloats(a.row_scale, n);
  const std::vector<float> row_offset = HalfsToFloats(a.row_offset, n);
  const std::vector<float> r2 =
      a.r2 ? HalfsToFloats(a.r2, kb) : std::vector<float>(static_cast<size_t>(kb), 1.0f);
  const std::vector<float> sal_scale = HalfsToFloats(a.salient_scale, n * groups);

  std::vector<float> xb(static_cast<size_t>(sign_bytes * 8), 0.0f);  // padding stays 0
  std::vector<float> xs(static_cast<size_t>(s));
  const SignTable& signs = Signs();
  const T* x = static_cast<const T*>(a.x);
  T* y = static_cast<T*>(a.y);

  for (int64_t r = 0; r < m; ++r) {
    const T* xr = x + r * k;
    float sum_b = 0.0f;
    for (int64_t c = 0; c < kb; ++c) {
      const float v = Load(xr, binary_channel[c]) * r2[c];
      xb[c] = v;
      sum_b += v;
    }
    for (int64_t j = 0; j < s; ++j) xs[j] = Load(xr, a.salient_idx[j]);

    for (int64_t o = 0; o < n; ++o) {
      // sum_c sign[o, c] * xb[c], eight partial sums (padding bits meet xb == 0).
      const uint8_t* sp = a.sign_packed + o * sign_bytes;
      float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (int64_t b = 0; b < sign_bytes; ++b) {
        const float* t = signs[sp[b]].data();
        const float* xv = xb.data() + b * 8;
        for (int i = 0; i < 8; ++i) part[i] += t[i] * xv[i];
      }
      const float dot = ((part[0] + part[1]) + (part[2] + part[3])) +
                        ((part[4] + part[5]) + (part[6] + part[7]));
      float acc = row_scale[o] * dot + row_offset[o] * sum_b;

      // sum_j (q - zero_g) * scale_g * xs[j], one group at a time. (Factoring out
      // zero_g * sum(xs) would save a subtraction but turn an infinite input into NaN.)
      const uint8_t* qp = a.salient_packed + o * sal_bytes;
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t j0 = g * gsz, j1 = std::min(s, j0 + gsz);
        const int zero = a.salient_zero[o * groups + g];
        float qx = 0.0f;
        for (int64_t j = j0; j < j1; ++j) {
          const int q = (qp[j >> 1] >> ((j & 1) * 4)) & 0xf;
          qx += static_cast<float>(q - zero) * xs[j];
        }
        acc += sal_scale[o * groups + g] * qx;
      }
      if (a.bias) acc += a.bias[o];
      Store(y, r * n + o, acc);
    }
  }
  return Status::Ok();
}

}  // namespace

Status RunCpuPlain(const Args& a) noexcept {
  try {
    if (a.m < 0 || a.k < 0 || a.n < 0 || a.s < 0 || a.s > a.k || a.group_size < 0)
      return Status::Error("bad sizes M=" + std::to_string(a.m) +
                           " K=" + std::to_string(a.k) + " N=" + std::to_string(a.n) +
                           " S=" + std::to_string(a.s) + " G=" + std::to_string(a.group_size));
    if (a.m == 0 || a.n == 0) return Status::Ok();
    const bool have_binary = a.k > a.s, have_salient = a.s > 0;
    if (!a.x || !a.y || !a.row_scale || !a.row_offset ||
        (have_binary && !a.sign_packed) ||
        (have_salient && (!a.salient_idx || !a.salient_packed || !a.salient_scale ||
                          !a.salient_zero)))
      return Status::Error("a required input pointer is null");
    return a.act == ActType::kFloat32 ? Run<float>(a) : Run<uint16_t>(a);
  } catch (...) {
    return Status::Error(ExceptionMessage());
  }
}

}  // namespace bml
}  // namespace qexport
