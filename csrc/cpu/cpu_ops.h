// The CPU operators that other CPU operators build on (defined in cost_cpu.cpp and sinkhorn_cpu.cpp).
#pragma once

#include <ATen/ATen.h>

namespace aplot_kernels {
namespace cpu {

// `t` contiguous in `type`, without a dispatch when it already is (these ops run per training step).
inline at::Tensor in_type(const at::Tensor& t, at::ScalarType type) {
  return t.scalar_type() == type && t.is_contiguous() ? t : t.to(type).contiguous();
}

at::Tensor aplot_cost_cpu(const at::Tensor& chosen_emb, const at::Tensor& rejected_emb, const at::Tensor& chosen_rewards,
                          const at::Tensor& rejected_rewards, double alpha, double temperature, double eps,
                          double sim_weight, double sim_offset);

at::Tensor sinkhorn_row_costs_cpu(const at::Tensor& C, const at::Tensor& a, const at::Tensor& b, double eps,
                                  int64_t n_iters, double tol, int64_t check_every);

}  // namespace cpu
}  // namespace aplot_kernels
