// Log-domain Sinkhorn on the GPU: the CUDA implementation of `aplot_kernels::sinkhorn_solve`.
//
// Same iteration as csrc/cpu/sinkhorn_cpu.cpp and the reference (POT's order,
// -inf potentials on zero weights, per-problem tolerance stop). Two paths:
//
// * fused: one block per problem, -C/eps held in shared memory, every
//   iteration, tolerance check and the final plan in one kernel; a problem
//   that meets the tolerance leaves its loop on its own.
// * tiled: for problems too large for shared memory. -C/eps is materialised
//   in both layouts once, then each half-iteration is one launch (a warp per
//   row, coalesced), the tolerance check is one launch that clears the
//   problem's `active` flag, and stopped problems skip their work. The host
//   loop launches a fixed sequence and never waits for the device.
//
// C may be float16, bfloat16, float32 (computed in float32) or float64.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>
#include <type_traits>

#include "common.cuh"
#include "../sinkhorn_args.h"

namespace aplot_kernels {
namespace cuda {
namespace {

constexpr int kFusedThreads = 256;
constexpr int kRowsPerBlock = 8;  // tiled path: one warp per row
constexpr int kTile = 32;         // tiled transpose

struct Options {
  double eps;
  int64_t n_iters;
  double tol;  // < 0: none
  int64_t check_every;
};

// ---------------------------------------------------------------------------
// Fused path: one block per problem.
// ---------------------------------------------------------------------------

// Row stride of -C/eps in shared memory: odd, so that a warp reading a column
// (rows i..i+31, fixed j) touches 32 different banks.
__host__ __device__ inline int shared_stride(int m) {
  return m | 1;
}

template <typename T>
size_t fused_shared_bytes(int n, int m) {
  return sizeof(T) * (static_cast<size_t>(n) * shared_stride(m) + 2 * n + 2 * m + kFusedThreads / kWarpSize + 1);
}

template <typename T, typename scalar_t>
__global__ void __launch_bounds__(kFusedThreads) sinkhorn_fused_kernel(
    const scalar_t* __restrict__ C, const T* __restrict__ a, const T* __restrict__ b, int n, int m, T eps,
    int n_iters, T tol, bool with_tol, int check_every, T* __restrict__ plan, T* __restrict__ f_out,
    T* __restrict__ g_out, T* __restrict__ cost_out, T* __restrict__ reg_out, int64_t* __restrict__ iters_out,
    T* __restrict__ err_out) {
  extern __shared__ unsigned char shared_raw[];
  T* neg_c = reinterpret_cast<T*>(shared_raw);
  const int ld = shared_stride(m);
  T* log_u = neg_c + static_cast<size_t>(n) * ld;
  T* log_v = log_u + n;
  T* log_a = log_v + m;
  T* log_b = log_a + n;
  T* scratch = log_b + m;

  const int problem = blockIdx.x;
  const scalar_t* Cp = C + static_cast<size_t>(problem) * n * m;
  const T* ap = a + static_cast<size_t>(problem) * n;
  const T* bp = b + static_cast<size_t>(problem) * m;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize, warps = blockDim.x / kWarpSize;
  const T neg_inf = neg_infinity<T>();

  for (int idx = threadIdx.x; idx < n * m; idx += blockDim.x) {
    const int i = idx / m, j = idx - i * m;
    neg_c[i * ld + j] = -(static_cast<T>(Cp[idx]) / eps);
  }
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const bool positive = ap[i] > T(0);
    log_a[i] = positive ? log_(ap[i]) : neg_inf;
    log_u[i] = positive ? T(0) : neg_inf;
  }
  for (int j = threadIdx.x; j < m; j += blockDim.x) log_b[j] = bp[j] > T(0) ? log_(bp[j]) : neg_inf;
  __syncthreads();

  bool measured = false;
  T err = 0;
  int iters = n_iters;
  for (int it = 1; it <= n_iters; ++it) {
    for (int j = warp; j < m; j += warps) {  // column potential
      if (log_b[j] == neg_inf) {
        if (lane == 0) log_v[j] = neg_inf;
        continue;
      }
      const T lse = warp_lse<T>(n, [&](int i) { return neg_c[i * ld + j] + log_u[i]; });
      if (lane == 0) log_v[j] = log_b[j] - lse;
    }
    __syncthreads();
    for (int i = warp; i < n; i += warps) {  // row potential
      if (log_a[i] == neg_inf) {
        if (lane == 0) log_u[i] = neg_inf;
        continue;
      }
      const T lse = warp_lse<T>(m, [&](int j) { return neg_c[i * ld + j] + log_v[j]; });
      if (lane == 0) log_u[i] = log_a[i] - lse;
    }
    __syncthreads();
    if (with_tol && it % check_every == 0) {
      T partial = 0;
      for (int j = warp; j < m; j += warps) {
        T col = 0;
        for (int i = lane; i < n; i += kWarpSize) col += exp_(log_u[i] + log_v[j] + neg_c[i * ld + j]);
        col = warp_sum(col);
        if (lane == 0) partial += absolute(col - bp[j]);
      }
      err = block_sum(partial, scratch);  // the same value in every thread: the exit below is uniform
      measured = true;
      if (err <= tol) {
        iters = it;
        break;
      }
    }
  }

  T* plan_p = plan + static_cast<size_t>(problem) * n * m;
  T cost_partial = 0;
  for (int idx = threadIdx.x; idx < n * m; idx += blockDim.x) {
    const int i = idx / m, j = idx - i * m;
    const T value = log_u[i] == neg_inf ? T(0) : exp_(log_u[i] + log_v[j] + neg_c[i * ld + j]);
    plan_p[idx] = value;
    cost_partial += value * static_cast<T>(Cp[idx]);
  }
  T dual_partial = 0;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const T f = ap[i] > T(0) ? eps * log_u[i] : T(0);
    f_out[static_cast<size_t>(problem) * n + i] = f;
    dual_partial += ap[i] * f;
  }
  for (int j = threadIdx.x; j < m; j += blockDim.x) {
    const T g = bp[j] > T(0) ? eps * log_v[j] : T(0);
    g_out[static_cast<size_t>(problem) * m + j] = g;
    dual_partial += bp[j] * g;
  }
  const T cost = block_sum(cost_partial, scratch);
  const T dual = block_sum(dual_partial, scratch);
  if (!measured) {  // never checked: the column violation of the final plan
    T partial = 0;
    for (int j = warp; j < m; j += warps) {
      T col = 0;
      for (int i = lane; i < n; i += kWarpSize)
        col += log_u[i] == neg_inf ? T(0) : exp_(log_u[i] + log_v[j] + neg_c[i * ld + j]);
      col = warp_sum(col);
      if (lane == 0) partial += absolute(col - bp[j]);
    }
    err = block_sum(partial, scratch);
  }
  if (threadIdx.x == 0) {
    cost_out[problem] = cost;
    reg_out[problem] = dual;
    iters_out[problem] = iters;
    err_out[problem] = err;
  }
}

// ---------------------------------------------------------------------------
// Tiled path.
// ---------------------------------------------------------------------------

// neg_c[b, i, j] = neg_c_t[b, j, i] = -C[b, i, j] / eps, through a shared tile
// so that both writes are coalesced.
template <typename T, typename scalar_t>
__global__ void scaled_cost_kernel(const scalar_t* __restrict__ C, int n, int m, T eps, T* __restrict__ neg_c,
                                   T* __restrict__ neg_c_t) {
  __shared__ T tile[kTile][kTile + 1];
  const size_t offset = static_cast<size_t>(blockIdx.z) * n * m;
  const int i0 = blockIdx.y * kTile, j0 = blockIdx.x * kTile;
  for (int di = threadIdx.y; di < kTile; di += blockDim.y) {
    const int i = i0 + di, j = j0 + threadIdx.x;
    if (i < n && j < m) {
      const T value = -(static_cast<T>(C[offset + static_cast<size_t>(i) * m + j]) / eps);
      neg_c[offset + static_cast<size_t>(i) * m + j] = value;
      tile[di][threadIdx.x] = value;
    }
  }
  __syncthreads();
  for (int dj = threadIdx.y; dj < kTile; dj += blockDim.y) {
    const int j = j0 + dj, i = i0 + threadIdx.x;
    if (i < n && j < m) neg_c_t[offset + static_cast<size_t>(j) * n + i] = tile[threadIdx.x][dj];
  }
}

// out[b, r] = log_w[b, r] - lse_c(mat[b, r, c] + vec[b, c]) for active problems; a warp per row.
template <typename T>
__global__ void lse_update_kernel(const T* __restrict__ mat, const T* __restrict__ vec, const T* __restrict__ log_w,
                                  T* __restrict__ out, const bool* __restrict__ active, int rows, int cols) {
  const int problem = blockIdx.y;
  if (!active[problem]) return;  // stopped: its potentials no longer change
  const int row = blockIdx.x * kRowsPerBlock + threadIdx.x / kWarpSize;
  if (row >= rows) return;
  const size_t r = static_cast<size_t>(problem) * rows + row;
  if (log_w[r] == neg_infinity<T>()) {
    if (threadIdx.x % kWarpSize == 0) out[r] = neg_infinity<T>();
    return;
  }
  const T* mat_row = mat + r * cols;
  const T* vec_p = vec + static_cast<size_t>(problem) * cols;
  const T lse = warp_lse<T>(cols, [&](int c) { return mat_row[c] + vec_p[c]; });
  if (threadIdx.x % kWarpSize == 0) out[r] = log_w[r] - lse;
}

// Tolerance check after iteration `it`: err = sum_j |(P^T 1)_j - b_j| per
// active problem (one block each); a problem meeting the tolerance stops.
template <typename T>
__global__ void check_kernel(const T* __restrict__ neg_c_t, const T* __restrict__ log_u, const T* __restrict__ log_v,
                             const T* __restrict__ b, int n, int m, T tol, int it, bool* __restrict__ active,
                             T* __restrict__ err, bool* __restrict__ measured, int64_t* __restrict__ iters) {
  __shared__ T scratch[1024 / kWarpSize + 1];
  const int problem = blockIdx.x;
  if (!active[problem]) return;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize, warps = blockDim.x / kWarpSize;
  const T* u = log_u + static_cast<size_t>(problem) * n;
  const T* v = log_v + static_cast<size_t>(problem) * m;
  const T* bp = b + static_cast<size_t>(problem) * m;
  T partial = 0;
  for (int j = warp; j < m; j += warps) {
    const T* row = neg_c_t + (static_cast<size_t>(problem) * m + j) * n;
    T col = 0;
    for (int i = lane; i < n; i += kWarpSize) col += exp_(u[i] + v[j] + row[i]);
    col = warp_sum(col);
    if (lane == 0) partial += absolute(col - bp[j]);
  }
  const T total = block_sum(partial, scratch);
  if (threadIdx.x == 0) {
    err[problem] = total;
    measured[problem] = true;
    if (total <= tol) {
      active[problem] = false;
      iters[problem] = it;
    }
  }
}

// plan[b, i, j] = exp(log_u + log_v - C / eps), exactly 0 on padded rows.
template <typename T>
__global__ void plan_kernel(const T* __restrict__ neg_c, const T* __restrict__ log_u, const T* __restrict__ log_v,
                            int n, int m, size_t total, T* __restrict__ plan) {
  for (size_t idx = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const size_t row = idx / m;  // b * n + i
    const size_t problem = row / n;
    const int j = static_cast<int>(idx - row * m);
    const T u = log_u[row];
    plan[idx] = u == neg_infinity<T>() ? T(0) : exp_(u + log_v[problem * m + j] + neg_c[idx]);
  }
}

using SolveResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

template <typename T, typename scalar_t>
bool try_fused(const at::Tensor& C, const at::Tensor& a, const at::Tensor& b, const Options& opt, SolveResult& out) {
  const int batch = static_cast<int>(C.size(0)), n = static_cast<int>(C.size(1)), m = static_cast<int>(C.size(2));
  const size_t bytes = fused_shared_bytes<T>(n, m);
  int device = 0, limit = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  if (bytes > static_cast<size_t>(limit)) return false;
  // One block per problem leaves most SMs idle for a few large problems: the tiled path spreads them.
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  if (static_cast<int64_t>(n) * m > 16384 && batch < sms) return false;
  auto kernel = sinkhorn_fused_kernel<T, scalar_t>;
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  }
  auto& [plan, f, g, cost, reg_cost, iters, err] = out;
  kernel<<<batch, kFusedThreads, bytes, c10::cuda::getCurrentCUDAStream()>>>(
      C.const_data_ptr<scalar_t>(), a.const_data_ptr<T>(), b.const_data_ptr<T>(), n, m, static_cast<T>(opt.eps),
      static_cast<int>(opt.n_iters), static_cast<T>(opt.tol), opt.tol >= 0, static_cast<int>(opt.check_every),
      plan.mutable_data_ptr<T>(), f.mutable_data_ptr<T>(), g.mutable_data_ptr<T>(), cost.mutable_data_ptr<T>(),
      reg_cost.mutable_data_ptr<T>(), iters.mutable_data_ptr<int64_t>(), err.mutable_data_ptr<T>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

template <typename T, typename scalar_t>
void run_tiled(const at::Tensor& C, const at::Tensor& a, const at::Tensor& b, const Options& opt, SolveResult& out) {
  const int batch = static_cast<int>(C.size(0)), n = static_cast<int>(C.size(1)), m = static_cast<int>(C.size(2));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto options = a.options();
  const T eps = static_cast<T>(opt.eps);
  at::Tensor neg_c = at::empty({batch, n, m}, options);
  at::Tensor neg_c_t = at::empty({batch, m, n}, options);
  {
    const dim3 grid((m + kTile - 1) / kTile, (n + kTile - 1) / kTile, batch), block(kTile, 8);
    scaled_cost_kernel<T, scalar_t><<<grid, block, 0, stream>>>(C.const_data_ptr<scalar_t>(), n, m, eps,
                                                                 neg_c.mutable_data_ptr<T>(), neg_c_t.mutable_data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const double inf = std::numeric_limits<double>::infinity();
  const at::Tensor log_a = at::where(a > 0, a.log(), -inf);
  const at::Tensor log_b = at::where(b > 0, b.log(), -inf);
  at::Tensor log_u = at::where(a > 0, at::zeros_like(a), at::full_like(a, -inf));
  at::Tensor log_v = at::zeros_like(b);
  at::Tensor active = at::ones({batch}, options.dtype(at::kBool));
  at::Tensor measured = at::zeros({batch}, options.dtype(at::kBool));
  auto& [plan, f, g, cost, reg_cost, iters, err] = out;
  iters.fill_(opt.n_iters);
  err.zero_();

  const int threads = kRowsPerBlock * kWarpSize;
  const dim3 grid_v((m + kRowsPerBlock - 1) / kRowsPerBlock, batch), grid_u((n + kRowsPerBlock - 1) / kRowsPerBlock, batch);
  const bool with_tol = opt.tol >= 0;
  for (int64_t it = 1; it <= opt.n_iters; ++it) {
    lse_update_kernel<T><<<grid_v, threads, 0, stream>>>(neg_c_t.const_data_ptr<T>(), log_u.const_data_ptr<T>(),
                                                         log_b.const_data_ptr<T>(), log_v.mutable_data_ptr<T>(),
                                                         active.const_data_ptr<bool>(), m, n);
    lse_update_kernel<T><<<grid_u, threads, 0, stream>>>(neg_c.const_data_ptr<T>(), log_v.const_data_ptr<T>(),
                                                         log_a.const_data_ptr<T>(), log_u.mutable_data_ptr<T>(),
                                                         active.const_data_ptr<bool>(), n, m);
    if (with_tol && it % opt.check_every == 0) {
      check_kernel<T><<<batch, 512, 0, stream>>>(neg_c_t.const_data_ptr<T>(), log_u.const_data_ptr<T>(),
                                                 log_v.const_data_ptr<T>(), b.const_data_ptr<T>(), n, m,
                                                 static_cast<T>(opt.tol), static_cast<int>(it),
                                                 active.mutable_data_ptr<bool>(), err.mutable_data_ptr<T>(),
                                                 measured.mutable_data_ptr<bool>(), iters.mutable_data_ptr<int64_t>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const size_t total = static_cast<size_t>(batch) * n * m;
  const int blocks = static_cast<int>(std::min<size_t>((total + 255) / 256, 65535));
  plan_kernel<T><<<blocks, 256, 0, stream>>>(neg_c.const_data_ptr<T>(), log_u.const_data_ptr<T>(),
                                             log_v.const_data_ptr<T>(), n, m, total, plan.mutable_data_ptr<T>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // The remaining reductions are small; ATen ops keep them on the device.
  f.copy_(at::where(a > 0, log_u * opt.eps, at::zeros_like(log_u)));
  g.copy_(at::where(b > 0, log_v * opt.eps, at::zeros_like(log_v)));
  cost.copy_((plan * C.to(plan.scalar_type())).sum({1, 2}));
  reg_cost.copy_((a * f).sum(-1) + (b * g).sum(-1));
  const at::Tensor final_err = (plan.sum(1) - b).abs().sum(-1);
  err.copy_(at::where(measured, err, final_err));
}

SolveResult sinkhorn_solve_cuda(const at::Tensor& C_in, const at::Tensor& a_in, const at::Tensor& b_in, double eps,
                                int64_t n_iters, double tol, int64_t check_every) {
  check_sinkhorn_solve_args(C_in, a_in, b_in, eps, n_iters, check_every);
  const int64_t batch = C_in.size(0), n = C_in.size(1), m = C_in.size(2);
  TORCH_CHECK(n * m < (int64_t(1) << 31), "sinkhorn_solve: problems over 2^31 entries are not supported");
  const c10::cuda::CUDAGuard guard(C_in.device());
  const at::ScalarType compute = C_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor C = C_in.contiguous();
  const at::Tensor a = a_in.to(compute).contiguous();
  const at::Tensor b = b_in.to(compute).contiguous();
  const auto options = C.options().dtype(compute);
  SolveResult out{at::empty({batch, n, m}, options), at::empty({batch, n}, options), at::empty({batch, m}, options),
                  at::empty({batch}, options),       at::empty({batch}, options),    at::empty({batch}, options.dtype(at::kLong)),
                  at::empty({batch}, options)};
  const Options opt{eps, n_iters, tol, check_every};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, C.scalar_type(), "sinkhorn_solve_cuda", [&] {
    using T = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    if (!try_fused<T, scalar_t>(C, a, b, opt, out)) run_tiled<T, scalar_t>(C, a, b, opt, out);
  });
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace aplot_kernels

TORCH_LIBRARY_IMPL(aplot_kernels, CUDA, m) {
  m.impl("sinkhorn_solve", &aplot_kernels::cuda::sinkhorn_solve_cuda);
}
