// qexport::BinaryMixedLinear CUDA kernels and launchers (docs/gpu.md, docs/format.md layout 1).
//
// Kernels, fp32 accumulation throughout:
// - PrepareKernel: binary_channel[c] for the k - s binary columns (binary search over
//   salient_idx, bml_unpack.h) and device-side flags for invalid salient_idx / zero points.
// - GemvKernel (m <= kGemvMaxM): the block gathers the binary-channel activations times r2
//   into shared memory (skewed by one float per 32 so the 32 lanes of a warp hit 32 banks),
//   the salient activations and sum_c xb[c]; then each warp owns output rows and walks the
//   packed sign row with coalesced loads (a 32-bit word per lane when the row length allows,
//   else a byte per lane), applying each sign by flipping the float's sign bit, and the 4-bit
//   codes of the row; a warp shuffle reduction ends each row.
//   y = row_scale * sum(sign * xb) + row_offset * sum(xb) + salient + bias.
// - GemmKernel (larger m, fp32 activations, and the fallback): a plain tiled shared-memory
//   SIMT GEMM (64x64 tile, 16-deep, 4x4 outputs per thread) over a virtual K of (k - s)
//   binary + s salient columns, with the weights dequantized while staged into shared memory:
//   row_scale*sign + row_offset for a binary column, (q - zero) * scale for a salient one.
// - GemmTcKernel (larger m, fp16 activations, sm_80+): tensor cores, bml_cuda_gemm_tc.cu.
// Launch picks one (Path::kAuto) and checks every CUDA call; the messages name the call and the
// problem shape.
//
// Size: GemvKernel is one kernel body of ~120 lines (GemmKernel ~75): the gather into shared
// memory, the per-warp walk over the packed rows and the reduction work on the same shared
// buffers and registers of one block, in the order described above, so each is kept whole and
// reads top to bottom in that order.
#include "binary_mixed_linear/bml_cuda.cuh"

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <string>

#include "binary_mixed_linear/bml_cuda_internal.cuh"
#include "binary_mixed_linear/bml_unpack.h"

namespace qexport {
namespace bml {
namespace cuda {
namespace {

namespace up = ::qexport::bml::unpack;

constexpr int kGemvThreads = 256;
constexpr int kGemvWarps = kGemvThreads / 32;
constexpr int kTileM = 64, kTileN = 64, kTileK = 16, kGemmThreads = 256;

using namespace detail;  // Load, Half, Store, Shape, CudaError (bml_cuda_internal.cuh)

// x * (+1 if bit else -1), exactly: flip the sign bit when the sign bit is 0.
__device__ __forceinline__ float ApplySign(float x, uint32_t bit) {
  return __int_as_float(__float_as_int(x) ^ static_cast<int>((bit ^ 1u) << 31));
}
// Index of binary column c in the skewed shared-memory row (one pad float per 32).
__device__ __forceinline__ int64_t Skew(int64_t c) { return c + (c >> 5); }

__global__ void PrepareKernel(const int32_t* __restrict__ sidx, const uint8_t* __restrict__ zero,
                              int64_t k, int64_t s, int64_t n, int64_t groups,
                              int32_t* __restrict__ bc, int32_t* __restrict__ flags) {
  const int64_t kb = k - s;
  const int64_t total = max(max(kb, s), n * groups);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (i < kb && bc) bc[i] = static_cast<int32_t>(up::BinaryChannel(i, sidx, s, k));
    if (!flags) continue;
    if (i < s) {
      const int32_t c = sidx[i];
      if (c < 0 || c >= k) atomicOr(flags, kSalientOutOfRange);
      if (i > 0 && c <= sidx[i - 1]) atomicOr(flags, kSalientNotIncreasing);
    }
    if (i < n * groups && zero[i] > 15) atomicOr(flags, kZeroAbove15);
  }
}

struct GemvLayout {
  int64_t kb32 = 0;    // binary columns rounded up to 32
  int64_t stride = 0;  // floats per m of the skewed xb buffer
  size_t bytes = 0;    // dynamic shared memory
};

GemvLayout GemvSmem(const CudaArgs& a) {
  GemvLayout l;
  const int64_t kb = a.k - a.s;
  l.kb32 = up::CeilDiv(kb, 32) * 32;
  l.stride = l.kb32 + l.kb32 / 32;
  l.bytes = sizeof(float) * static_cast<size_t>(a.m * (l.stride + a.s + 1) + kGemvWarps * a.m);
  return l;
}

template <typename T>
__global__ void __launch_bounds__(kGemvThreads)
GemvKernel(CudaArgs a, int64_t stride, int rows_per_warp) {
  extern __shared__ float smem[];
  const int m = static_cast<int>(a.m);
  const int64_t k = a.k, s = a.s, kb = k - s;
  const int64_t kb32 = up::CeilDiv(kb, 32) * 32;
  float* xb = smem;                   // [m][stride], skewed, zero padded
  float* xs = xb + m * stride;        // [m][s]
  float* sumb = xs + m * s;           // [m]
  float* partial = sumb + m;          // [warps][m]
  const T* x = static_cast<const T*>(a.x);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

  // Gather (every block does it: X rows are small and stay in L2).
  for (int mm = 0; mm < m; ++mm) {
    float local = 0.0f;
    for (int64_t c = tid; c < kb32; c += kGemvThreads) {
      float v = 0.0f;
      if (c < kb) {
        v = Load(x, mm * k + a.binary_channel[c]);
        if (a.r2) v *= Half(a.r2, c);
      }
      xb[mm * stride + Skew(c)] = v;
      local += v;
    }
    for (int64_t j = tid; j < s; j += kGemvThreads)
      xs[mm * s + j] = Load(x, mm * k + up::ClampChannel(a.salient_idx[j], k));
    for (int off = 16; off > 0; off >>= 1) local += __shfl_xor_sync(0xffffffffu, local, off);
    if (lane == 0) partial[warp * m + mm] = local;
  }
  __syncthreads();
  if (tid < m) {
    float t = 0.0f;
    for (int w = 0; w < kGemvWarps; ++w) t += partial[w * m + tid];
    sumb[tid] = t;
  }
  __syncthreads();

  const int64_t sign_bytes = up::SignBytes(k, s), sal_bytes = up::SalientBytes(s);
  const int64_t groups = up::NumGroups(s, a.group_size), gsz = up::GroupSize(s, a.group_size);
  const bool words = (sign_bytes & 3) == 0;
  const int64_t row0 = (static_cast<int64_t>(blockIdx.x) * kGemvWarps + warp) * rows_per_warp;
  T* y = static_cast<T*>(a.y);

  for (int r = 0; r < rows_per_warp; ++r) {
    const int64_t o = row0 + r;
    if (o >= a.n) break;
    float acc[kGemvMaxM], sal[kGemvMaxM];
#pragma unroll
    for (int mm = 0; mm < kGemvMaxM; ++mm) acc[mm] = sal[mm] = 0.0f;

    if (kb > 0) {
      const uint8_t* srow = a.sign_packed + o * sign_bytes;
      if (words) {
        const uint32_t* wrow = reinterpret_cast<const uint32_t*>(srow);
        for (int64_t w = lane; w < sign_bytes / 4; w += 32) {
          const uint32_t bits = __ldg(wrow + w);
          const float* base = xb + w * 33;  // Skew(32 * w)
#pragma unroll
          for (int mm = 0; mm < kGemvMaxM; ++mm) {
            if (mm >= m) break;
            float t = 0.0f;
#pragma unroll 8
            for (int i = 0; i < 32; ++i) t += ApplySign(base[mm * stride + i], (bits >> i) & 1u);
            acc[mm] += t;
          }
        }
      } else {
        for (int64_t b = lane; b < sign_bytes; b += 32) {
          const uint32_t bits = __ldg(srow + b);
#pragma unroll
          for (int mm = 0; mm < kGemvMaxM; ++mm) {
            if (mm >= m) break;
            float t = 0.0f;
#pragma unroll
            for (int i = 0; i < 8; ++i)
              t += ApplySign(xb[mm * stride + Skew(8 * b + i)], (bits >> i) & 1u);
            acc[mm] += t;
          }
        }
      }
    }
    if (s > 0) {
      const uint8_t* qrow = a.salient_packed + o * sal_bytes;
      const uint8_t* zrow = a.salient_zero + o * groups;
      for (int64_t b = lane; b < sal_bytes; b += 32) {
        const uint32_t byte = __ldg(qrow + b);
#pragma unroll
        for (int t = 0; t < 2; ++t) {
          const int64_t j = 2 * b + t;
          if (j >= s) break;
          const int64_t g = j / gsz;
          const float w = static_cast<float>(static_cast<int>((byte >> (4 * t)) & 0xfu) -
                                             static_cast<int>(__ldg(zrow + g))) *
                          Half(a.salient_scale, o * groups + g);
#pragma unroll
          for (int mm = 0; mm < kGemvMaxM; ++mm) {
            if (mm >= m) break;
            sal[mm] += w * xs[mm * s + j];
          }
        }
      }
    }
#pragma unroll
    for (int mm = 0; mm < kGemvMaxM; ++mm) {
      if (mm >= m) break;
      float v = acc[mm], q = sal[mm];
      for (int off = 16; off > 0; off >>= 1) {
        v += __shfl_xor_sync(0xffffffffu, v, off);
        q += __shfl_xor_sync(0xffffffffu, q, off);
      }
      if (lane == 0) {
        float out = Half(a.row_scale, o) * v + Half(a.row_offset, o) * sumb[mm] + q;
        if (a.bias) out += __ldg(a.bias + o);
        Store(y, mm * a.n + o, out);
      }
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kGemmThreads) GemmKernel(CudaArgs a) {
  __shared__ float as[kTileK][kTileM + 1];
  __shared__ float bs[kTileK][kTileN + 1];
  const int64_t k = a.k, s = a.s, kb = k - s, vk = k;  // virtual K: kb binary + s salient
  const int64_t sign_bytes = up::SignBytes(k, s), sal_bytes = up::SalientBytes(s);
  const int64_t groups = up::NumGroups(s, a.group_size), gsz = up::GroupSize(s, a.group_size);
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kTileM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kTileN;
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const T* x = static_cast<const T*>(a.x);
  float acc[4][4] = {};

  for (int64_t v0 = 0; v0 < vk; v0 += kTileK) {
    for (int i = tid; i < kTileK * kTileM; i += kGemmThreads) {
      const int kk = i % kTileK, mm = i / kTileK;
      const int64_t v = v0 + kk, row = m0 + mm;
      float val = 0.0f;
      if (row < a.m && v < vk) {
        if (v < kb) {
          val = Load(x, row * k + a.binary_channel[v]);
          if (a.r2) val *= Half(a.r2, v);
        } else {
          val = Load(x, row * k + up::ClampChannel(a.salient_idx[v - kb], k));
        }
      }
      as[kk][mm] = val;
    }
    for (int i = tid; i < kTileK * kTileN; i += kGemmThreads) {
      const int kk = i % kTileK, nn = i / kTileK;
      const int64_t v = v0 + kk, o = n0 + nn;
      float w = 0.0f;
      if (o < a.n && v < vk) {
        if (v < kb) {
          const uint32_t bit = (__ldg(a.sign_packed + o * sign_bytes + (v >> 3)) >> (v & 7)) & 1u;
          w = Half(a.row_offset, o) + ApplySign(Half(a.row_scale, o), bit);
        } else {
          const int64_t j = v - kb, g = j / gsz;
          const int q = (__ldg(a.salient_packed + o * sal_bytes + (j >> 1)) >> ((j & 1) * 4)) & 0xf;
          w = static_cast<float>(q - static_cast<int>(__ldg(a.salient_zero + o * groups + g))) *
              Half(a.salient_scale, o * groups + g);
        }
      }
      bs[kk][nn] = w;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTileK; ++kk) {
      float av[4], bv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) av[i] = as[kk][ty * 4 + i];
#pragma unroll
      for (int j = 0; j < 4; ++j) bv[j] = bs[kk][tx * 4 + j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += av[i] * bv[j];
    }
    __syncthreads();
  }
  T* y = static_cast<T*>(a.y);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t row = m0 + ty * 4 + i;
    if (row >= a.m) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t o = n0 + tx * 4 + j;
      if (o >= a.n) continue;
      float out = acc[i][j];
      if (a.bias) out += __ldg(a.bias + o);
      Store(y, row * a.n + o, out);
    }
  }
}

// Max dynamic shared memory per block on the current device (opt-in), or an error.
Status MaxSmem(int* bytes, int* sms, const std::string& shape) {
  int dev = 0;
  QEXPORT_CUDA_CHECK(cudaGetDevice(&dev), "cudaGetDevice", shape);
  QEXPORT_CUDA_CHECK(cudaDeviceGetAttribute(bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev),
                     "cudaDeviceGetAttribute(MaxSharedMemoryPerBlockOptin)", shape);
  QEXPORT_CUDA_CHECK(cudaDeviceGetAttribute(sms, cudaDevAttrMultiProcessorCount, dev),
                     "cudaDeviceGetAttribute(MultiProcessorCount)", shape);
  return Status::Ok();
}

// Compute capability (major * 10 + minor) of the current device, queried once per device and
// cached (device ordinals >= kCcCacheSize are queried every time).
constexpr int kCcCacheSize = 64;
std::atomic<int> g_cc_cache[kCcCacheSize] = {};

Status DeviceCc(int* cc, const std::string& shape) {
  int dev = 0;
  QEXPORT_CUDA_CHECK(cudaGetDevice(&dev), "cudaGetDevice", shape);
  if (dev >= 0 && dev < kCcCacheSize) {
    const int cached = g_cc_cache[dev].load(std::memory_order_relaxed);
    if (cached > 0) {
      *cc = cached;
      return Status::Ok();
    }
  }
  int major = 0, minor = 0;
  QEXPORT_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev),
                     "cudaDeviceGetAttribute(ComputeCapabilityMajor)", shape);
  QEXPORT_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev),
                     "cudaDeviceGetAttribute(ComputeCapabilityMinor)", shape);
  *cc = major * 10 + minor;
  if (dev >= 0 && dev < kCcCacheSize) g_cc_cache[dev].store(*cc, std::memory_order_relaxed);
  return Status::Ok();
}

constexpr int kTcMinCc = 80;  // mma.sync m16n8k16 with fp16 inputs and fp32 accumulation

template <typename T>
Status LaunchGemv(const CudaArgs& a, const GemvLayout& l, int sms, cudaStream_t stream,
                  const std::string& shape) {
  // Enough blocks for two waves of the SMs, up to 8 output rows per warp.
  int64_t rows_per_warp = a.n / (static_cast<int64_t>(kGemvWarps) * 2 * (sms > 0 ? sms : 1));
  rows_per_warp = rows_per_warp < 1 ? 1 : (rows_per_warp > 8 ? 8 : rows_per_warp);
  const int64_t blocks = up::CeilDiv(a.n, kGemvWarps * rows_per_warp);
  if (blocks > 0x7fffffff) return Status::Error("too many output rows for the GEMV grid " + shape);
  if (l.bytes > 48 * 1024)
    QEXPORT_CUDA_CHECK(cudaFuncSetAttribute(GemvKernel<T>,
                                            cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(l.bytes)),
                       "cudaFuncSetAttribute(gemv, MaxDynamicSharedMemorySize)", shape);
  GemvKernel<T><<<static_cast<unsigned>(blocks), kGemvThreads, l.bytes, stream>>>(
      a, l.stride, static_cast<int>(rows_per_warp));
  QEXPORT_CUDA_CHECK(cudaGetLastError(), "launch of the GEMV kernel", shape);
  return Status::Ok();
}

template <typename T>
Status LaunchGemm(const CudaArgs& a, cudaStream_t stream, const std::string& shape) {
  const int64_t mt = up::CeilDiv(a.m, kTileM), nt = up::CeilDiv(a.n, kTileN);
  if (mt > 0x7fffffff || nt > 65535)
    return Status::Error("problem too large for the GEMM grid " + shape);
  dim3 grid(static_cast<unsigned>(mt), static_cast<unsigned>(nt));
  GemmKernel<T><<<grid, kGemmThreads, 0, stream>>>(a);
  QEXPORT_CUDA_CHECK(cudaGetLastError(), "launch of the GEMM kernel", shape);
  return Status::Ok();
}


}  // namespace

size_t BinaryChannelBytes(int64_t k, int64_t s) noexcept {
  const int64_t kb = k > s ? k - s : 0;
  return static_cast<size_t>(up::CeilDiv(kb * 4, 256) * 256);
}

Status LaunchPrepare(const int32_t* salient_idx, const uint8_t* salient_zero, int64_t k,
                     int64_t s, int64_t n, int64_t groups, int32_t* binary_channel,
                     int32_t* error_flags, cudaStream_t stream) noexcept {
  try {
    const std::string shape = "(prepare K=" + std::to_string(k) + ", S=" + std::to_string(s) +
                              ", N=" + std::to_string(n) + ", groups=" + std::to_string(groups) +
                              ")";
    if (k < 0 || s < 0 || s > k || n < 0 || groups < 0)
      return Status::Error("bad sizes " + shape);
    if (error_flags)
      QEXPORT_CUDA_CHECK(cudaMemsetAsync(error_flags, 0, sizeof(int32_t), stream),
                         "cudaMemsetAsync(error flags)", shape);
    const int64_t total = std::max(std::max(k - s, s), n * groups);
    if (total == 0) return Status::Ok();
    if ((k > s && !binary_channel) || (s > 0 && !salient_idx) || (n * groups > 0 && !salient_zero))
      return Status::Error("a required device pointer is null " + shape);
    const int64_t blocks = std::min<int64_t>(up::CeilDiv(total, 256), 1024);
    PrepareKernel<<<static_cast<unsigned>(blocks), 256, 0, stream>>>(
        salient_idx, error_flags ? salient_zero : nullptr, k, s, error_flags ? n : 0,
        groups, binary_channel, error_flags);
    QEXPORT_CUDA_CHECK(cudaGetLastError(), "launch of the prepare kernel", shape);
    return Status::Ok();
  } catch (...) {
    return Status::Error("BinaryMixedLinear CUDA prepare: out of host memory");
  }
}

const char* AutoPathName(const CudaArgs& a) noexcept {
  try {
    int max_smem = 0, dev = 0, cc = 0;
    if (cudaGetDevice(&dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) !=
            cudaSuccess) {
      cudaGetLastError();
      return "gemm";
    }
    if (a.m <= kGemvMaxM && GemvSmem(a).bytes <= static_cast<size_t>(max_smem)) return "gemv";
    if (a.act == Act::kFloat16 && DeviceCc(&cc, std::string()) && cc >= kTcMinCc)
      return "gemm_tc";
    cudaGetLastError();
    return "gemm";
  } catch (...) {
    return "gemm";
  }
}

Status Launch(const CudaArgs& a, Path path, cudaStream_t stream) noexcept {
  try {
    const std::string shape = Shape(a);
    if (a.m < 0 || a.k < 1 || a.n < 0 || a.s < 0 || a.s > a.k || a.group_size < 0)
      return Status::Error("BinaryMixedLinear CUDA: bad sizes " + shape);
    if (a.m == 0 || a.n == 0) return Status::Ok();
    const bool have_binary = a.k > a.s, have_salient = a.s > 0;
    if (!a.x || !a.y || !a.row_scale || !a.row_offset ||
        (have_binary && (!a.sign_packed || !a.binary_channel)) ||
        (have_salient && (!a.salient_idx || !a.salient_packed || !a.salient_scale ||
                          !a.salient_zero)))
      return Status::Error("BinaryMixedLinear CUDA: a required device pointer is null " + shape);
    int max_smem = 0, sms = 0;
    Status st = MaxSmem(&max_smem, &sms, shape);
    if (!st) return st;
    const GemvLayout l = GemvSmem(a);
    const bool gemv_fits = a.m <= kGemvMaxM && l.bytes <= static_cast<size_t>(max_smem);
    bool gemv = path == Path::kGemv || (path == Path::kAuto && gemv_fits);
    if (gemv && !gemv_fits)
      return Status::Error("BinaryMixedLinear CUDA: the GEMV path needs M <= " +
                           std::to_string(kGemvMaxM) + " and " + std::to_string(l.bytes) +
                           " bytes of shared memory (device max " + std::to_string(max_smem) +
                           ") " + shape);
    // Tensor cores: fp16 activations on sm_80+, whenever the GEMV path is not taken (kAuto),
    // or forced (kGemmTc, an error when not possible).
    bool tc = false;
    if (!gemv && a.act == Act::kFloat16 && (path == Path::kAuto || path == Path::kGemmTc)) {
      int cc = 0;
      st = DeviceCc(&cc, shape);
      if (!st) return st;
      tc = cc >= kTcMinCc;
      if (path == Path::kGemmTc && !tc)
        return Status::Error("BinaryMixedLinear CUDA: the tensor-core path needs compute "
                             "capability >= 8.0, the device has " + std::to_string(cc / 10) +
                             "." + std::to_string(cc % 10) + " " + shape);
    }
    if (path == Path::kGemmTc && a.act != Act::kFloat16)
      return Status::Error("BinaryMixedLinear CUDA: the tensor-core path takes fp16 activations " +
                           shape);
    if (tc) return LaunchGemmTc(a, stream, shape);
    if (a.act == Act::kFloat32)
      return gemv ? LaunchGemv<float>(a, l, sms, stream, shape)
                  : LaunchGemm<float>(a, stream, shape);
    return gemv ? LaunchGemv<uint16_t>(a, l, sms, stream, shape)
                : LaunchGemm<uint16_t>(a, stream, shape);
  } catch (...) {
    return Status::Error("BinaryMixedLinear CUDA: out of host memory");
  }
}

}  // namespace cuda
}  // namespace bml
}  // namespace qexport
