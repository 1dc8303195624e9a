// The detached APLOT margin on the CPU as one operator: `aplot_kernels::aplot_margins`.
//
// The APLOT cost (cost_cpu.cpp), the row transport costs sum_j P_ij C_ij of Sinkhorn with uniform
// marginals (sinkhorn_cpu.cpp), times scale * n: the numbers of those two operators called in turn,
// without the round trips through Python between them, which at training sizes (16 pairs) took
// longer than the arithmetic.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>

#include "cpu_ops.h"

namespace aplot_kernels {
namespace cpu {
namespace {

at::Tensor aplot_margins_cpu(const at::Tensor& chosen_emb, const at::Tensor& rejected_emb, const at::Tensor& chosen_rewards,
                             const at::Tensor& rejected_rewards, double alpha, double temperature, double norm_eps,
                             double sim_weight, double sim_offset, double eps, int64_t n_iters, double scale) {
  // [N, D] embeddings with [N] rewards are one problem; [B, N, D] with [B, N] a batch of them.
  const bool unbatched = chosen_emb.dim() == 2;
  TORCH_CHECK(chosen_emb.dim() == (unbatched ? 2 : 3) && rejected_emb.dim() == chosen_emb.dim(),
              "aplot_margins: embeddings must be [N, D] and [M, D] (or [B, N, D] and [B, M, D])");
  TORCH_CHECK(chosen_rewards.dim() == chosen_emb.dim() - 1 && rejected_rewards.dim() == chosen_emb.dim() - 1,
              "aplot_margins: rewards must have one dimension less than the embeddings");
  auto batched = [&](const at::Tensor& t) { return unbatched ? t.unsqueeze(0) : t; };
  const at::Tensor cost = aplot_cost_cpu(batched(chosen_emb), batched(rejected_emb), batched(chosen_rewards),
                                         batched(rejected_rewards), alpha, temperature, norm_eps, sim_weight, sim_offset);
  const int64_t batch = cost.size(0), n = cost.size(1), m = cost.size(2);
  at::Tensor a = at::empty({batch, n}, cost.options()), b = at::empty({batch, m}, cost.options());
  at::Tensor margins;
  AT_DISPATCH_FLOATING_TYPES(cost.scalar_type(), "aplot_margins_cpu", [&] {
    // Written directly: at these sizes a fill or multiply through TensorIterator costs more than its work.
    std::fill_n(a.mutable_data_ptr<scalar_t>(), batch * n, static_cast<scalar_t>(1.0 / static_cast<double>(n)));
    std::fill_n(b.mutable_data_ptr<scalar_t>(), batch * m, static_cast<scalar_t>(1.0 / static_cast<double>(m)));
    margins = sinkhorn_row_costs_cpu(cost, a, b, eps, n_iters, -1.0, 1);
    scalar_t* values = margins.mutable_data_ptr<scalar_t>();
    const scalar_t factor = static_cast<scalar_t>(scale * static_cast<double>(n));  // the reference's scale * n
    for (int64_t i = 0; i < batch * n; ++i) values[i] *= factor;
  });
  return unbatched ? margins.squeeze(0) : margins;
}

}  // namespace
}  // namespace cpu
}  // namespace aplot_kernels

TORCH_LIBRARY_IMPL(aplot_kernels, CPU, m) {
  m.impl("aplot_margins", &aplot_kernels::cpu::aplot_margins_cpu);
}

// The margins are detached by definition: autograd passes the call straight to the kernel (no guard
// needed around it, and no graph node even when the rewards require grad).
TORCH_LIBRARY_IMPL(aplot_kernels, Autograd, m) {
  m.impl("aplot_margins", torch::CppFunction::makeFallthrough());
}
