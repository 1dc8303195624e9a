// Cosine and APLOT cost matrices on the GPU (CUDA implementations of
// `aplot_kernels::cosine_cost` and `aplot_kernels::aplot_cost`).
//
// A warp per row normalises the embeddings (reading float16/bfloat16/float32/
// float64, writing the compute dtype), at::bmm does the product (cuBLAS),
// and one elementwise kernel applies the epilogue in place.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common.cuh"

namespace aplot_kernels {
namespace cuda {
namespace {

constexpr int kRowsPerBlock = 8;

__device__ __forceinline__ float sqrt_(float x) { return sqrtf(x); }
__device__ __forceinline__ double sqrt_(double x) { return sqrt(x); }

// A power of two sigma with max |sigma x| in [0.5, 1) for the row's peak (1 for a zero row), kept a normal
// number. Scaling by it is exact, so the squared norm of sigma x is that of x times sigma^2 to the bit where
// the latter is finite and normal, and never overflows (entries near 1e19 would in float32).
__device__ __forceinline__ float pow2_scale(float peak) {
  if (peak == 0.f) return 1.f;
  int e = 0;
  frexpf(peak, &e);
  return ldexpf(1.f, -min(max(e, -127), 126));
}
__device__ __forceinline__ double pow2_scale(double peak) {
  if (peak == 0.0) return 1.0;
  int e = 0;
  frexp(peak, &e);
  return ldexp(1.0, -min(max(e, -1023), 1022));
}

// out[r, :] = x[r, :] / max(||x[r, :]||, eps), computed as (sigma x) / (sigma max(||x||, eps)); a warp per row.
template <typename T, typename scalar_t>
__global__ void normalize_kernel(const scalar_t* __restrict__ x, int64_t rows, int width, T eps, T* __restrict__ out) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarpSize;
  if (row >= rows) return;
  const int lane = threadIdx.x % kWarpSize;
  const scalar_t* x_row = x + row * width;
  T peak = 0;
  for (int d = lane; d < width; d += kWarpSize) peak = max(peak, absolute(static_cast<T>(x_row[d])));
  const T scale = pow2_scale(warp_max(peak));
  T squares = 0;
  for (int d = lane; d < width; d += kWarpSize) {
    const T value = static_cast<T>(x_row[d]) * scale;
    squares += value * value;
  }
  squares = warp_sum(squares);
  const T norm = sqrt_(squares);
  const T floor = eps * scale;  // exact; inf only for rows far below eps, whose x_hat then reads 0
  const T denom = norm > floor ? norm : floor;
  for (int d = lane; d < width; d += kWarpSize) out[row * width + d] = (static_cast<T>(x_row[d]) * scale) / denom;
}

template <typename T>
__global__ void cosine_epilogue_kernel(T* __restrict__ s, int64_t total) {
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x)
    s[idx] = T(1) - s[idx];
}

// s <- alpha * sigmoid(-|r_c[i] - r_r[j]| / temperature) + coef * (offset + s), in place over [B, N, M].
template <typename T>
__global__ void aplot_epilogue_kernel(T* __restrict__ s, const T* __restrict__ r_c, const T* __restrict__ r_r, int n,
                                      int m, int64_t total, T alpha, T temperature, T coef, T offset) {
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = idx / m;  // b * n + i
    const int j = static_cast<int>(idx - row * m);
    const int64_t problem = row / n;
    const T delta = absolute(r_c[row] - r_r[problem * m + j]);
    const T gap = T(1) / (T(1) + exp_(delta / temperature));
    s[idx] = alpha * gap + coef * (offset + s[idx]);
  }
}

at::ScalarType compute_type(std::initializer_list<at::Tensor> tensors) {
  at::ScalarType type = at::kFloat;
  for (const auto& t : tensors) type = at::promote_types(type, t.scalar_type());
  return type;
}

int grid_for(int64_t total) {
  return static_cast<int>(std::min<int64_t>((total + 255) / 256, 65535));
}

at::Tensor normalized(const at::Tensor& x_in, double eps, at::ScalarType type) {
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(type));
  const int64_t rows = x.numel() / x.size(-1);
  const int width = static_cast<int>(x.size(-1));
  const int blocks = static_cast<int>((rows + kRowsPerBlock - 1) / kRowsPerBlock);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "normalize_cuda", [&] {
    if (type == at::kDouble) {
      normalize_kernel<double, scalar_t><<<blocks, kRowsPerBlock * kWarpSize, 0, c10::cuda::getCurrentCUDAStream()>>>(
          x.const_data_ptr<scalar_t>(), rows, width, eps, out.mutable_data_ptr<double>());
    } else {
      normalize_kernel<float, scalar_t><<<blocks, kRowsPerBlock * kWarpSize, 0, c10::cuda::getCurrentCUDAStream()>>>(
          x.const_data_ptr<scalar_t>(), rows, width, static_cast<float>(eps), out.mutable_data_ptr<float>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor similarity(const at::Tensor& x, const at::Tensor& y, double eps, at::ScalarType type) {
  return at::bmm(normalized(x, eps, type), normalized(y, eps, type).transpose(1, 2)).contiguous();
}

at::Tensor cosine_cost_cuda(const at::Tensor& x, const at::Tensor& y, double eps) {
  TORCH_CHECK(x.dim() == 3 && y.dim() == 3 && x.size(0) == y.size(0) && x.size(2) == y.size(2),
              "cosine_cost: embeddings must be [B, N, D] and [B, M, D]");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::ScalarType type = compute_type({x, y});
  at::Tensor cost = similarity(x, y, eps, type);
  const int64_t total = cost.numel();
  AT_DISPATCH_FLOATING_TYPES(type, "cosine_cost_cuda", [&] {
    cosine_epilogue_kernel<scalar_t><<<grid_for(total), 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
        cost.mutable_data_ptr<scalar_t>(), total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return cost;
}

at::Tensor aplot_cost_cuda(const at::Tensor& chosen_emb, const at::Tensor& rejected_emb, const at::Tensor& chosen_rewards,
                           const at::Tensor& rejected_rewards, double alpha, double temperature, double eps,
                           double sim_weight, double sim_offset) {
  TORCH_CHECK(chosen_emb.dim() == 3 && rejected_emb.dim() == 3 && chosen_emb.size(0) == rejected_emb.size(0) &&
                  chosen_emb.size(2) == rejected_emb.size(2),
              "aplot_cost: embeddings must be [B, N, D] and [B, M, D]");
  const c10::cuda::CUDAGuard guard(chosen_emb.device());
  const int n = static_cast<int>(chosen_emb.size(1)), m = static_cast<int>(rejected_emb.size(1));
  const at::ScalarType type = compute_type({chosen_emb, rejected_emb, chosen_rewards, rejected_rewards});
  at::Tensor cost = similarity(chosen_emb, rejected_emb, eps, type);
  const at::Tensor r_c = chosen_rewards.to(type).contiguous();
  const at::Tensor r_r = rejected_rewards.to(type).contiguous();
  const int64_t total = cost.numel();
  AT_DISPATCH_FLOATING_TYPES(type, "aplot_cost_cuda", [&] {
    aplot_epilogue_kernel<scalar_t><<<grid_for(total), 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
        cost.mutable_data_ptr<scalar_t>(), r_c.const_data_ptr<scalar_t>(), r_r.const_data_ptr<scalar_t>(), n, m, total,
        static_cast<scalar_t>(alpha), static_cast<scalar_t>(temperature), static_cast<scalar_t>(sim_weight),
        static_cast<scalar_t>(sim_offset));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return cost;
}

}  // namespace
}  // namespace cuda
}  // namespace aplot_kernels

TORCH_LIBRARY_IMPL(aplot_kernels, CUDA, m) {
  m.impl("cosine_cost", &aplot_kernels::cuda::cosine_cost_cuda);
  m.impl("aplot_cost", &aplot_kernels::cuda::aplot_cost_cuda);
}
