// Small device helpers shared by the CUDA kernels.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <limits>

namespace aplot_kernels {
namespace cuda {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

template <typename T>
__device__ __forceinline__ T neg_infinity() {
  return -std::numeric_limits<T>::infinity();
}

// Full-precision exp/log (no fast-math intrinsics: the results must match the
// reference to rounding, and potentials reach |x| ~ 1e2 at small eps).
__device__ __forceinline__ float exp_(float x) { return expf(x); }
__device__ __forceinline__ double exp_(double x) { return exp(x); }
__device__ __forceinline__ float log_(float x) { return logf(x); }
__device__ __forceinline__ double log_(double x) { return log(x); }

template <typename T>
__device__ __forceinline__ T absolute(T x) {
  return x < T(0) ? -x : x;
}

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
    const T other = __shfl_xor_sync(kFullMask, v, offset);
    v = other > v ? other : v;
  }
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// The sum of `v` over the block, returned to every thread. `scratch` holds one
// entry per warp plus one; the order of the additions is fixed, so the result
// is deterministic.
template <typename T>
__device__ T block_sum(T v, T* scratch) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int warps = (blockDim.x + kWarpSize - 1) / kWarpSize;
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    T total = 0;
    for (int w = 0; w < warps; ++w) total += scratch[w];
    scratch[warps] = total;
  }
  __syncthreads();
  return scratch[warps];
}

// log sum_k exp(load(k)) over k < count, computed by one warp (shifted by the
// maximum, two passes over the values); every lane gets the result.
template <typename T, typename Load>
__device__ __forceinline__ T warp_lse(int count, const Load& load) {
  const int lane = threadIdx.x % kWarpSize;
  T m = neg_infinity<T>();
  for (int k = lane; k < count; k += kWarpSize) {
    const T x = load(k);
    m = x > m ? x : m;
  }
  m = warp_max(m);
  if (m == neg_infinity<T>()) return m;
  T s = 0;
  for (int k = lane; k < count; k += kWarpSize) s += exp_(load(k) - m);
  s = warp_sum(s);
  return log_(s) + m;
}

}  // namespace cuda
}  // namespace aplot_kernels
