// Cosine and APLOT cost matrices on the CPU: `aplot_kernels::cosine_cost`, `aplot_kernels::aplot_cost`.
//
// Row norms (a read-only pass), the product of the inputs by at::bmm (the
// BLAS GEMM), then one fused pass per row: divide by both norms, epilogue.
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

// max(||x_r||, eps) of every row of x [B, N, D] (contiguous, in its compute type): [B * N]. Reads x once.
at::Tensor clamped_norms(const at::Tensor& x, double eps) {
  const int64_t rows = x.numel() / x.size(-1), width = x.size(-1);
  at::Tensor out = at::empty({rows}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "clamped_norms_cpu", [&] {
    const scalar_t* src = x.const_data_ptr<scalar_t>();
    scalar_t* norms = out.mutable_data_ptr<scalar_t>();
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
        norms[r] = std::max(std::sqrt(squares), static_cast<scalar_t>(eps));
      }
    });
  });
  return out;
}

// S[b, i, j] = <x[b, i], y[b, j]> / |x[b, i]|_eps / |y[b, j]|_eps, then `finish(row, S[row, :], m)` on each
// row while it is in cache. The product runs on the inputs as they are (no normalised copies to write
// and read back: on one core that was a third of the time); dividing twice, as the Triton kernels
// do, keeps tiny norms from underflowing a product of the two.
template <typename scalar_t, typename Finish>
at::Tensor similarity(const at::Tensor& x_in, const at::Tensor& y_in, double eps, Finish finish) {
  const at::ScalarType type = c10::CppTypeToScalarType<scalar_t>::value;
  const at::Tensor x = x_in.to(type).contiguous();
  const at::Tensor y = y_in.to(type).contiguous();
  const at::Tensor x_norm = clamped_norms(x, eps), y_norm = clamped_norms(y, eps);
  at::Tensor s = at::bmm(x, y.transpose(1, 2)).contiguous();
  const int64_t n = x.size(1), m = y.size(1);
  scalar_t* out = s.mutable_data_ptr<scalar_t>();
  const scalar_t* nx = x_norm.const_data_ptr<scalar_t>();
  const scalar_t* ny = y_norm.const_data_ptr<scalar_t>();
  at::parallel_for(0, s.numel() / m, std::max<int64_t>(1, 16384 / m), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      scalar_t* s_row = out + row * m;
      const scalar_t* ny_row = ny + (row / n) * m;
      const scalar_t nx_row = nx[row];
      for (int64_t j = 0; j < m; ++j) s_row[j] = s_row[j] / nx_row / ny_row[j];
      finish(row, s_row, m);
    }
  });
  return s;
}

void check_embeddings(const at::Tensor& x, const at::Tensor& y, const char* op) {
  TORCH_CHECK(x.dim() == 3 && y.dim() == 3, op, ": embeddings must be [B, N, D] and [B, M, D]");
  TORCH_CHECK(x.size(0) == y.size(0) && x.size(2) == y.size(2), op, ": batch and width must match, got ", x.sizes(),
              " and ", y.sizes());
}

at::Tensor cosine_cost_cpu(const at::Tensor& x, const at::Tensor& y, double eps) {
  check_embeddings(x, y, "cosine_cost");
  at::Tensor cost;
  AT_DISPATCH_FLOATING_TYPES(compute_type({x, y}), "cosine_cost_cpu", [&] {
    cost = similarity<scalar_t>(x, y, eps, [](int64_t, scalar_t* s, int64_t m) {
      for (int64_t j = 0; j < m; ++j) s[j] = scalar_t(1) - s[j];
    });
  });
  return cost;
}

at::Tensor aplot_cost_cpu(const at::Tensor& chosen_emb, const at::Tensor& rejected_emb, const at::Tensor& chosen_rewards,
                          const at::Tensor& rejected_rewards, double alpha, double temperature, double eps,
                          double sim_weight, double sim_offset) {
  check_embeddings(chosen_emb, rejected_emb, "aplot_cost");
  const int64_t batch = chosen_emb.size(0), n = chosen_emb.size(1), m = rejected_emb.size(1);
  TORCH_CHECK(chosen_rewards.dim() == 2 && chosen_rewards.size(0) == batch && chosen_rewards.size(1) == n,
              "aplot_cost: chosen_rewards must be [B, N]");
  TORCH_CHECK(rejected_rewards.dim() == 2 && rejected_rewards.size(0) == batch && rejected_rewards.size(1) == m,
              "aplot_cost: rejected_rewards must be [B, M]");
  const at::ScalarType type = compute_type({chosen_emb, rejected_emb, chosen_rewards, rejected_rewards});
  const at::Tensor r_c = chosen_rewards.to(type).contiguous();
  const at::Tensor r_r = rejected_rewards.to(type).contiguous();
  at::Tensor cost;
  AT_DISPATCH_FLOATING_TYPES(type, "aplot_cost_cpu", [&] {
    const Kernels<scalar_t>& k = kernels<scalar_t>();
    const scalar_t* rc = r_c.const_data_ptr<scalar_t>();
    const scalar_t* rr = r_r.const_data_ptr<scalar_t>();
    // The reference's grouping: alpha * gap + sim_weight * (sim_offset + S), coefficients from double.
    const scalar_t coef = static_cast<scalar_t>(sim_weight), offset = static_cast<scalar_t>(sim_offset);
    cost = similarity<scalar_t>(chosen_emb, rejected_emb, eps, [&](int64_t row, scalar_t* s, int64_t count) {
      k.aplot_epilogue_row(s, rc[row], rr + (row / n) * m, static_cast<scalar_t>(alpha),
                           static_cast<scalar_t>(temperature), coef, offset, count);
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
