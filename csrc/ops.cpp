// The operator schemas (torch.ops.aplot_kernels.*) and the Python module aplot_kernels._C.
//
// CPU implementations live in cpu/, CUDA ones in cuda/ (compiled only when
// the build has CUDA, which defines APLOT_WITH_CUDA).
#include <torch/extension.h>
#include <torch/library.h>

TORCH_LIBRARY(aplot_kernels, m) {
  // tol < 0 means no tolerance: exactly n_iters iterations.
  // Returns (plan [B,N,M], f [B,N], g [B,M], cost [B], reg_cost [B], n_iters [B] int64, err [B]).
  m.def(
      "sinkhorn_solve(Tensor C, Tensor a, Tensor b, float eps, int n_iters, float tol, int check_every) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // sum_j P_ij C_ij per row [B, N] after the same iterations, without storing the plan (CPU only;
  // the Python wrapper reduces the plan of sinkhorn_solve on other devices).
  m.def(
      "sinkhorn_row_costs(Tensor C, Tensor a, Tensor b, float eps, int n_iters, float tol, int check_every) -> "
      "Tensor");
  m.def("cosine_cost(Tensor x, Tensor y, float eps) -> Tensor");
  // C = alpha * (1 - sigmoid(|delta| / temperature)) + sim_weight * (sim_offset + S): sim_weight = (1 - alpha) / 2,
  // sim_offset = 1 for the "unit" similarity (1 + S) / 2; 1 - alpha and 0 for the raw cosine S.
  m.def(
      "aplot_cost(Tensor chosen_emb, Tensor rejected_emb, Tensor chosen_rewards, Tensor rejected_rewards, "
      "float alpha, float temperature, float eps, float sim_weight, float sim_offset) -> Tensor");
  // The detached APLOT margins scale * n * sum_j P_ij C_ij of aplot_cost then sinkhorn_row_costs (uniform
  // marginals, n_iters iterations): [N] for [N, D] embeddings, [B, N] for [B, N, D]. CPU only.
  m.def(
      "aplot_margins(Tensor chosen_emb, Tensor rejected_emb, Tensor chosen_rewards, Tensor rejected_rewards, "
      "float alpha, float temperature, float norm_eps, float sim_weight, float sim_offset, float eps, int n_iters, "
      "float scale) -> Tensor");
  // The index of the first of `tensors` that holds NaN or inf, -1 if none: the eager value check of
  // aplot_kernels._checks (CPU tensors only; compiled code does not check values).
  m.def("first_nonfinite(Tensor[] tensors) -> int");
}

namespace aplot_kernels {
namespace cpu {
const char* isa_name();
}
}  // namespace aplot_kernels

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "Compiled kernels of aplot_kernels; the operators are torch.ops.aplot_kernels.*";
#ifdef APLOT_WITH_CUDA
  module.attr("WITH_CUDA") = true;
#else
  module.attr("WITH_CUDA") = false;
#endif
  module.attr("CPU_ISA") = aplot_kernels::cpu::isa_name();
}
