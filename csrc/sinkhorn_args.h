// Argument checks of the `aplot_kernels::sinkhorn_solve` operator, shared by
// its CPU and CUDA implementations (the Python wrapper checks user input first;
// these guard direct calls of the operator).
#pragma once

#include <ATen/ATen.h>

namespace aplot_kernels {

inline void check_sinkhorn_solve_args(const at::Tensor& C, const at::Tensor& a, const at::Tensor& b, double eps,
                                      int64_t n_iters, int64_t check_every) {
  TORCH_CHECK(C.dim() == 3, "sinkhorn_solve: C must be [B, N, M], got ", C.sizes());
  TORCH_CHECK(eps > 0, "sinkhorn_solve: eps must be > 0");
  TORCH_CHECK(n_iters >= 1 && check_every >= 1, "sinkhorn_solve: n_iters and check_every must be >= 1");
  TORCH_CHECK(a.dim() == 2 && a.size(0) == C.size(0) && a.size(1) == C.size(1), "sinkhorn_solve: a must be [B, N]");
  TORCH_CHECK(b.dim() == 2 && b.size(0) == C.size(0) && b.size(1) == C.size(2), "sinkhorn_solve: b must be [B, M]");
}

}  // namespace aplot_kernels
