// Cosine and APLOT cost matrices on the CPU: `aplot_kernels::cosine_cost`, `aplot_kernels::aplot_cost`.
//
// Row scales and norms (a read-only pass), the product of the inputs by at::bmm
// (the BLAS GEMM), then one fused pass per row: divide by both norms, epilogue.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu_kernels.h"
#include "cpu_ops.h"

namespace aplot_kernels {
namespace cpu {
namespace {

at::ScalarType compute_type(std::initializer_list<at::Tensor> tensors) {
  at::ScalarType type = at::kFloat;
  for (const auto& t : tensors) type = at::promote_types(type, t.scalar_type());
  return type;
}

// Rows are normalised as x_hat = (sigma x) / (sigma max(||x||, eps)) with sigma a power of two per row: 1
// where max |x| lies in [2^-S, 2^S] (no sum of squares or product of such rows can overflow or
// underflow), else 2^-e for max |x| = f 2^e, f in [0.5, 1). Scaling by a power of two is exact, so every
// result is that of the unscaled rows wherever those are finite and normal.
template <typename T>
struct RowScaling {
  static constexpr int kSafeExponent = std::numeric_limits<T>::max_exponent / 2 - 14;  // 50 (float), 498 (double)

  static T scale_for(T peak) {
    if (peak == T(0)) return T(1);
    int e = 0;
    std::frexp(peak, &e);
    if (e >= -kSafeExponent && e <= kSafeExponent) return T(1);
    // Keep 2^-e a normal number: e in [1 - max_exponent, 1 - min_exponent].
    e = std::min(std::max(e, 1 - std::numeric_limits<T>::max_exponent), 1 - std::numeric_limits<T>::min_exponent);
    return std::ldexp(T(1), -e);
  }
};

// Per row of x [rows, width] (contiguous, in its compute type): sigma (see RowScaling) and
// sigma max(||x_r||, eps). Returns whether any sigma differs from 1. A row is read once, twice where
// sigma is not 1.
template <typename scalar_t>
bool scaled_norms(const scalar_t* src, int64_t rows, int64_t width, double eps, std::vector<scalar_t>& sigma,
                  std::vector<scalar_t>& clamped) {
  sigma.resize(rows);
  clamped.resize(rows);
  std::atomic<bool> any_scaled(false);
  const Kernels<scalar_t>& k = kernels<scalar_t>();
  at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / width), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* x_row = src + r * width;
      scalar_t peak = 0;
      scalar_t squares = k.sum_of_squares(x_row, width, scalar_t(1), &peak);
      const scalar_t scale = RowScaling<scalar_t>::scale_for(peak);
      if (scale != scalar_t(1)) {  // the unscaled sum may have overflowed or underflowed: again, scaled
        any_scaled.store(true, std::memory_order_relaxed);
        squares = k.sum_of_squares(x_row, width, scale, &peak);
      }
      sigma[r] = scale;
      clamped[r] = std::max(std::sqrt(squares), static_cast<scalar_t>(static_cast<double>(scale) * eps));
    }
  });
  return any_scaled.load();
}

// x [B, N, D] with each row r multiplied by scales[r] (exact: powers of two).
template <typename scalar_t>
at::Tensor scaled_rows(const at::Tensor& x, std::vector<scalar_t>& scales) {
  return x * at::from_blob(scales.data(), {x.size(0), x.size(1), 1}, x.options());
}

// Products of at most this many multiply-adds (n * m * d per problem) run as dot products in the
// row loop of `similarity`, without at::bmm: below it the GEMM call costs more than the arithmetic,
// above it the GEMM is faster (the crossover measured on one core: docs/design.md).
constexpr int64_t kDirectProductMax = int64_t(1) << 14;

// S[b, i, j] = <x[b, i], y[b, j]> / |x[b, i]|_eps / |y[b, j]|_eps, then `finish(row, S[row, :], m)` on each
// row while it is in cache. The product runs on the inputs as they are (no normalised copies to write
// and read back: on one core that was a third of the time) unless a row needs scaling, then on the
// rows times their powers of two; dividing twice, as the Triton kernels do, keeps tiny norms from
// underflowing a product of the two.
template <typename scalar_t, typename Finish>
at::Tensor similarity(const at::Tensor& x_in, const at::Tensor& y_in, double eps, Finish finish) {
  const at::ScalarType type = c10::CppTypeToScalarType<scalar_t>::value;
  const at::Tensor x = in_type(x_in, type), y = in_type(y_in, type);
  const int64_t n = x.size(1), m = y.size(1), width = x.size(2);
  std::vector<scalar_t> x_scale, x_norm, y_scale, y_norm;
  const bool x_scaled = scaled_norms(x.const_data_ptr<scalar_t>(), x.numel() / width, width, eps, x_scale, x_norm);
  const bool y_scaled = scaled_norms(y.const_data_ptr<scalar_t>(), y.numel() / width, width, eps, y_scale, y_norm);
  const bool direct = n * m * width <= kDirectProductMax;
  at::Tensor s = direct ? at::empty({x.size(0), n, m}, x.options())
                        : at::bmm(x_scaled ? scaled_rows(x, x_scale) : x,
                                  (y_scaled ? scaled_rows(y, y_scale) : y).transpose(1, 2))
                              .contiguous();
  scalar_t* out = s.mutable_data_ptr<scalar_t>();
  const scalar_t* nx = x_norm.data();
  const scalar_t* ny = y_norm.data();
  const scalar_t* sx = x_scale.data();
  const scalar_t* sy = y_scale.data();
  const scalar_t* xs = x.const_data_ptr<scalar_t>();
  const scalar_t* ys = y.const_data_ptr<scalar_t>();
  const Kernels<scalar_t>& k = kernels<scalar_t>();
  at::parallel_for(0, s.numel() / m, std::max<int64_t>(1, 16384 / m), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      scalar_t* s_row = out + row * m;
      const int64_t first_col = (row / n) * m;  // row of y (and of its norms) of this problem's column 0
      const scalar_t* ny_row = ny + first_col;
      const scalar_t nx_row = nx[row];
      if (direct) k.scaled_dots(xs + row * width, sx[row], ys + first_col * width, sy + first_col, width, m, s_row);
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

}  // namespace

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
  const at::Tensor r_c = in_type(chosen_rewards, type), r_r = in_type(rejected_rewards, type);
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

}  // namespace cpu
}  // namespace aplot_kernels

TORCH_LIBRARY_IMPL(aplot_kernels, CPU, m) {
  m.impl("cosine_cost", &aplot_kernels::cpu::cosine_cost_cpu);
  m.impl("aplot_cost", &aplot_kernels::cpu::aplot_cost_cpu);
}
