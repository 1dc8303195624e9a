// Cosine and APLOT cost matrices on the CPU: `aplot_kernels::cosine_cost`, `aplot_kernels::aplot_cost`.
//
// Normalised rows (one fused pass: norm, clamp, divide), the product by
// at::bmm (the BLAS GEMM), then one fused pass for the epilogue.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "cpu_kernels.h"

namespace aplot_kernels {
namespace cpu {
namespace {

at::ScalarType compute_type(std::initializer_list<at::Tensor> tensors) {
  at::ScalarType type = at::kFloat;
  for (const auto& t : tensors) type = at::promote_types(type, t.scalar_type());
  return type;
}

// x / max(||x||, eps) along the last dimension: [B, N, D] -> [B, N, D] in `type`.
at::Tensor normalized(const at::Tensor& x_in, double eps, at::ScalarType type) {
  const at::Tensor x = x_in.to(type).contiguous();
  at::Tensor out = at::empty_like(x);
  const int64_t rows = x.numel() / x.size(-1), width = x.size(-1);
  AT_DISPATCH_FLOATING_TYPES(type, "normalized_cpu", [&] {
    const scalar_t* src = x.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / width), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* x_row = src + r * width;
        // Eight interleaved partial sums: a fixed order the compiler can vectorise.
        scalar_t partial[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        int64_t d = 0;
        for (; d + 8 <= width; d += 8)
          for (int lane = 0; lane < 8; ++lane) partial[lane] += x_row[d + lane] * x_row[d + lane];
        for (; d < width; ++d) partial[0] += x_row[d] * x_row[d];
        scalar_t squares = 0;
        for (int lane = 0; lane < 8; ++lane) squares += partial[lane];
        const scalar_t denom = std::max(std::sqrt(squares), static_cast<scalar_t>(eps));
        for (int64_t d = 0; d < width; ++d) dst[r * width + d] = x_row[d] / denom;
      }
    });
  });
  return out;
}

// S[b, i, j] = <x_hat[b, i], y_hat[b, j]>.
at::Tensor similarity(const at::Tensor& x, const at::Tensor& y, double eps, at::ScalarType type) {
  return at::bmm(normalized(x, eps, type), normalized(y, eps, type).transpose(1, 2));
}

void check_embeddings(const at::Tensor& x, const at::Tensor& y, const char* op) {
  TORCH_CHECK(x.dim() == 3 && y.dim() == 3, op, ": embeddings must be [B, N, D] and [B, M, D]");
  TORCH_CHECK(x.size(0) == y.size(0) && x.size(2) == y.size(2), op, ": batch and width must match, got ", x.sizes(),
              " and ", y.sizes());
}

at::Tensor cosine_cost_cpu(const at::Tensor& x, const at::Tensor& y, double eps) {
  check_embeddings(x, y, "cosine_cost");
  const at::ScalarType type = compute_type({x, y});
  at::Tensor cost = similarity(x, y, eps, type).contiguous();
  AT_DISPATCH_FLOATING_TYPES(type, "cosine_cost_cpu", [&] {
    scalar_t* s = cost.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, cost.numel(), 16384, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) s[k] = scalar_t(1) - s[k];
    });
  });
  return cost;
}

at::Tensor aplot_cost_cpu(const at::Tensor& chosen_emb, const at::Tensor& rejected_emb, const at::Tensor& chosen_rewards,
                          const at::Tensor& rejected_rewards, double alpha, double temperature, double eps) {
  check_embeddings(chosen_emb, rejected_emb, "aplot_cost");
  const int64_t batch = chosen_emb.size(0), n = chosen_emb.size(1), m = rejected_emb.size(1);
  TORCH_CHECK(chosen_rewards.dim() == 2 && chosen_rewards.size(0) == batch && chosen_rewards.size(1) == n,
              "aplot_cost: chosen_rewards must be [B, N]");
  TORCH_CHECK(rejected_rewards.dim() == 2 && rejected_rewards.size(0) == batch && rejected_rewards.size(1) == m,
              "aplot_cost: rejected_rewards must be [B, M]");
  const at::ScalarType type = compute_type({chosen_emb, rejected_emb, chosen_rewards, rejected_rewards});
  at::Tensor cost = similarity(chosen_emb, rejected_emb, eps, type).contiguous();
  const at::Tensor r_c = chosen_rewards.to(type).contiguous();
  const at::Tensor r_r = rejected_rewards.to(type).contiguous();
  AT_DISPATCH_FLOATING_TYPES(type, "aplot_cost_cpu", [&] {
    const Kernels<scalar_t>& k = kernels<scalar_t>();
    scalar_t* s = cost.mutable_data_ptr<scalar_t>();
    const scalar_t* rc = r_c.const_data_ptr<scalar_t>();
    const scalar_t* rr = r_r.const_data_ptr<scalar_t>();
    // The reference's grouping: alpha * gap + ((1 - alpha) * 0.5) * (1 + S), coefficients in double.
    const scalar_t coef = static_cast<scalar_t>((1.0 - alpha) * 0.5);
    at::parallel_for(0, batch * n, std::max<int64_t>(1, 16384 / m), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        k.aplot_epilogue_row(s + row * m, rc[row], rr + (row / n) * m, static_cast<scalar_t>(alpha),
                             static_cast<scalar_t>(temperature), coef, m);
      }
    });
  });
  return cost;
}

}  // namespace
}  // namespace cpu
}  // namespace aplot_kernels

TORCH_LIBRARY_IMPL(aplot_kernels, CPU, m) {
  m.impl("cosine_cost", &aplot_kernels::cpu::cosine_cost_cpu);
  m.impl("aplot_cost", &aplot_kernels::cpu::aplot_cost_cpu);
}
