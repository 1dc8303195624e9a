// Log-domain Sinkhorn on the CPU: the `aplot_kernels::sinkhorn_solve` operator.
//
// It reproduces aplot_kernels/sinkhorn/reference.py step for step (POT's
// order: column potential, then row potential, from zero potentials; -inf
// potentials on zero weights; per-problem tolerance stop after every
// check_every-th iteration), so its numbers are the reference's up to
// floating-point rounding.
//
// The first iteration runs in the log domain on -C/eps, stored row-major (the
// column log-sum-exps with vector lanes along the columns, the row ones along
// each row). From the second iteration on it runs in the scaling domain: the
// kernel is the plan at the last absorption, exp(-C/eps + alpha_i + beta_j),
// each half-iteration is a matrix-vector product (a row update and the next
// column update's sums share one pass over the kernel), and the scalings are
// absorbed back into the log potentials whenever one leaves [1e-4, 1e4]. Kernel
// entries below the smallest normal number are flushed to zero, so a row or
// column sum is trusted only while it is large enough that the flushed entries
// cannot change it by more than an ulp; a smaller one (a tiny weight, or a column
// that a row update left almost empty) sends the problem back to the log domain
// for its remaining iterations. The plan, potentials and err are always formed
// in the log domain exactly as the reference forms them.
//
// Threads go over problems when there are enough of them, otherwise over the
// rows or column blocks of each pass. Every value is computed by the same loop
// in the same order either way, so results do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <cstddef>
#include <cstring>
#include <memory>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu_kernels.h"
#include "cpu_ops.h"
#include "../sinkhorn_args.h"

namespace aplot_kernels {
namespace cpu {
namespace {

int64_t round_up(int64_t n, int64_t multiple) {
  return (n + multiple - 1) / multiple * multiple;
}

struct Options {
  double eps;
  int64_t n_iters;
  double tol;  // < 0: no tolerance, run n_iters iterations
  int64_t check_every;
};

// Rows per block of the fused scaling pass. Fixed, so that its column sums
// (block partials added in block order) do not depend on the thread count.
constexpr int64_t kRowBlock = 64;

// Scratch memory of the calling thread, kept between calls up to kKeepBytes: at training sizes
// (16 x 16) the dozen allocations of a fresh workspace cost as much as the iterations. Larger or
// nested requests get memory of their own. The first `zeroed` bytes are zero-filled; the rest is
// left uninitialised (every entry is written before it is read, and zero-filling the [n, m_pad]
// arrays cost as much as a dozen iterations at 1024 x 1024).
class Scratch {
 public:
  // `sizes`: (bytes, of which zero-filled first).
  explicit Scratch(std::pair<size_t, size_t> sizes) {
    const auto [bytes, zeroed] = sizes;
    static thread_local std::unique_ptr<std::byte[]> kept;
    static thread_local size_t kept_bytes = 0;
    static thread_local bool kept_in_use = false;
    if (bytes <= kKeepBytes && !kept_in_use) {
      if (kept_bytes < bytes) {
        kept = std::make_unique_for_overwrite<std::byte[]>(kKeepBytes);
        kept_bytes = kKeepBytes;
      }
      data_ = kept.get();
      in_use_ = &kept_in_use;
      kept_in_use = true;
    } else {
      own_ = std::make_unique_for_overwrite<std::byte[]>(bytes);
      data_ = own_.get();
    }
    std::memset(data_, 0, zeroed);
  }
  ~Scratch() {
    if (in_use_) *in_use_ = false;
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  std::byte* data() { return data_; }

 private:
  static constexpr size_t kKeepBytes = size_t(1) << 18;
  std::unique_ptr<std::byte[]> own_;
  std::byte* data_ = nullptr;
  bool* in_use_ = nullptr;
};

// `size` values of U inside a Scratch (the parts of std::vector's interface the solver uses).
template <typename U>
struct Array {
  U* ptr = nullptr;
  int64_t size = 0;
  U* data() { return ptr; }
  const U* data() const { return ptr; }
  U* begin() { return ptr; }
  U* end() { return ptr + size; }
  U& operator[](int64_t i) { return ptr[i]; }
  const U& operator[](int64_t i) const { return ptr[i]; }
};

// Scratch memory for one problem of size n x m, reused across problems.
template <typename T>
struct Workspace {
  int64_t n, m, n_pad, m_pad;
  // Zero-filled at construction:
  Array<T> log_u;          // [n_pad] f / eps, padding 0
  Array<T> log_v;          // [m_pad] g / eps, padding 0
  Array<T> log_a;          // [n] log a, -inf at zero weights
  Array<T> log_b;          // [m]
  Array<T> col_sum;        // [m] column sums of the plan
  Array<T> plan_row;       // [m_pad]
  Array<double> row_cost;  // [n] sum_j P_ij C_ij, accumulated in double (as accurate as torch's sums)
  // Scaling domain: kernel[i, j] = exp(-C_ij / eps + alpha_i + beta_j) with
  // log_u = alpha + log(scale_u), log_v = beta + log(scale_v).
  Array<T> alpha;          // [n]
  Array<T> beta;           // [m_pad], padding 0
  Array<T> scale_u;        // [n]
  Array<T> scale_v;        // [m_pad], padding 0
  Array<T> sums;           // [max(n_pad, m_pad)] row or column sums of the scaled kernel
  // Uninitialised:
  Array<T> neg_c;          // [n, m_pad] -C / eps, padding -inf
  Array<T> kernel;         // [n, m_pad], padding 0
  Array<T> block_sums;     // [ceil(n / kRowBlock), m_pad] column sums of each block of kernel rows

  Workspace(int64_t n_, int64_t m_)
      : n(n_), m(m_), n_pad(round_up(n_, vector_width<T>())), m_pad(round_up(m_, vector_width<T>())),
        scratch_(layout(nullptr)) {
    layout(scratch_.data());
  }

 private:
  Scratch scratch_;

  // Places every array at 64-byte aligned offsets from `base`; returns (bytes needed, bytes of the
  // zero-filled arrays). Called once to size the scratch memory, once to point into it.
  std::pair<size_t, size_t> layout(std::byte* base) {
    size_t offset = 0;
    auto place = [&](auto& array, int64_t count) {
      using U = std::remove_reference_t<decltype(*array.ptr)>;
      array.ptr = base ? reinterpret_cast<U*>(base + offset) : nullptr;
      array.size = count;
      offset += (static_cast<size_t>(count) * sizeof(U) + 63) / 64 * 64;
    };
    place(log_u, n_pad);
    place(log_v, m_pad);
    place(log_a, n);
    place(log_b, m);
    place(col_sum, m);
    place(plan_row, m_pad);
    place(row_cost, n);
    place(alpha, n);
    place(beta, m_pad);
    place(scale_u, n);
    place(scale_v, m_pad);
    place(sums, std::max(n_pad, m_pad));
    const size_t zeroed = offset;
    place(neg_c, n * m_pad);
    place(kernel, n * m_pad);
    place(block_sums, (n + kRowBlock - 1) / kRowBlock * m_pad);
    return {offset, zeroed};
  }
};

// Pointers to one problem's inputs and outputs. `plan` and `f` to `err` are null for the
// row-costs operator, which stores sum_j P_ij C_ij into `row_costs` instead.
template <typename T, typename scalar_t>
struct Problem {
  const scalar_t* C;  // [n, m]
  const T* a;         // [n]
  const T* b;         // [m]
  T* plan;            // [n, m] or null
  T* row_costs;       // [n] or null
  T* f;               // [n]
  T* g;               // [m]
  T* cost;
  T* reg_cost;
  int64_t* n_iters;
  T* err;
};

template <typename T, typename scalar_t>
void solve_problem(const Problem<T, scalar_t>& p, Workspace<T>& ws, const Options& opt, bool parallel_rows) {
  const Kernels<T>& k = kernels<T>();
  const int64_t n = ws.n, m = ws.m, m_pad = ws.m_pad;
  const T neg_inf = -std::numeric_limits<T>::infinity();
  const T eps = static_cast<T>(opt.eps);
  // Rows of a pass go to threads in chunks of at least ~16k elements.
  auto for_rows = [&](int64_t rows, int64_t row_len, const auto& body) {
    if (parallel_rows) {
      at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(row_len, 1)), body);
    } else {
      body(0, rows);
    }
  };

  // Column sums with vector lanes along the columns: a block of columns streams every row.
  constexpr int64_t kColumnBlock = 4 * vector_width<T>();
  auto for_columns = [&](int64_t cols, int64_t rows, const auto& body) {
    const int64_t blocks = (cols + kColumnBlock - 1) / kColumnBlock;
    auto blocked = [&](int64_t begin, int64_t end) { body(begin * kColumnBlock, std::min(cols, end * kColumnBlock)); };
    if (parallel_rows) {
      at::parallel_for(0, blocks, std::max<int64_t>(1, 16384 / std::max<int64_t>(rows * kColumnBlock, 1)), blocked);
    } else {
      blocked(0, blocks);
    }
  };

  for_rows(n, m, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      T* row = ws.neg_c.data() + i * m_pad;
      const scalar_t* c_row = p.C + i * m;
      for (int64_t j = 0; j < m; ++j) row[j] = -(static_cast<T>(c_row[j]) / eps);
      for (int64_t j = m; j < m_pad; ++j) row[j] = neg_inf;
    }
  });
  for (int64_t i = 0; i < n; ++i) {
    const bool positive = p.a[i] > 0;
    ws.log_a[i] = positive ? std::log(p.a[i]) : neg_inf;
    ws.log_u[i] = positive ? T(0) : neg_inf;  // padded rows stay out of the first column update
  }
  for (int64_t j = 0; j < m; ++j) ws.log_b[j] = p.b[j] > 0 ? std::log(p.b[j]) : neg_inf;
  std::fill(ws.log_u.begin() + n, ws.log_u.end(), T(0));
  std::fill(ws.log_v.begin(), ws.log_v.end(), T(0));

  const bool with_tol = opt.tol >= 0;
  const T tol = static_cast<T>(opt.tol);
  bool measured = false;
  T err = 0;
  int64_t iters = opt.n_iters;
  // Scaling domain (after the first iteration): the kernel is the plan at the
  // last absorption, each half-iteration is a matrix-vector product instead of
  // n * m exps, and the scalings are absorbed back into the log potentials
  // whenever one leaves [1 / kRange, kRange], so that no entry that matters can
  // underflow. Same iterates as the log domain up to rounding.
  constexpr T kRange = T(1e4);
  // The reference's err: sum_j |sum_i exp(log_u_i + log_v_j - C_ij / eps) - b_j|, rows summed in order.
  auto column_violation = [&] {
    std::fill(ws.col_sum.begin(), ws.col_sum.end(), T(0));
    for (int64_t i = 0; i < n; ++i) {
      if (ws.log_u[i] == neg_inf) continue;
      k.exp_row(ws.neg_c.data() + i * m_pad, ws.log_u[i], ws.log_v.data(), ws.plan_row.data(), m_pad);
      for (int64_t j = 0; j < m; ++j) ws.col_sum[j] += ws.plan_row[j];
    }
    T total = 0;
    for (int64_t j = 0; j < m; ++j) total += std::abs(ws.col_sum[j] - p.b[j]);
    return total;
  };
  bool scaled = false, absorb = true;
  bool log_domain = false;      // a sum fell below its floor: every later iteration runs in the log domain
  bool col_sums_ready = false;  // ws.sums[0, m) already holds the column sums for the current scale_u
  // A sum of `count` kernel entries times scalings s_k: each entry is exact to within the smallest
  // normal number (exp flushes below it), so the sum is exact to an ulp once it is at least
  // (count + sum_k s_k) * kFloor. Scalings in use lie below kRange (else they are absorbed), except
  // the column ones of the current iteration: those are summed when one is outside.
  constexpr T kFloor = std::numeric_limits<T>::min() / std::numeric_limits<T>::epsilon();
  const int64_t row_blocks = (n + kRowBlock - 1) / kRowBlock;
  auto sync_log_v = [&] {
    for (int64_t j = 0; j < m; ++j) ws.log_v[j] = p.b[j] > 0 ? ws.beta[j] + std::log(ws.scale_v[j]) : neg_inf;
  };
  auto sync_potentials = [&] {  // log_u, log_v from the scalings
    for (int64_t i = 0; i < n; ++i) ws.log_u[i] = p.a[i] > 0 ? ws.alpha[i] + std::log(ws.scale_u[i]) : neg_inf;
    sync_log_v();
  };
  for (int64_t it = 1; it <= opt.n_iters; ++it) {
    bool in_log_domain = it == 1 || log_domain;
    bool outside_v = false;  // a column scaling left [1 / kRange, kRange]
    if (!in_log_domain) {
      if (absorb) {
        if (scaled) sync_potentials();
        std::copy(ws.log_u.begin(), ws.log_u.begin() + n, ws.alpha.begin());
        std::copy(ws.log_v.begin(), ws.log_v.end(), ws.beta.begin());
        for_rows(n, m_pad, [&](int64_t begin, int64_t end) {
          for (int64_t i = begin; i < end; ++i) {
            T* row = ws.kernel.data() + i * m_pad;
            if (ws.alpha[i] == neg_inf) {
              std::fill(row, row + m_pad, T(0));
            } else {
              k.exp_row(ws.neg_c.data() + i * m_pad, ws.alpha[i], ws.beta.data(), row, m_pad);
            }
          }
        });
        for (int64_t i = 0; i < n; ++i) ws.scale_u[i] = p.a[i] > 0 ? T(1) : T(0);
        std::fill(ws.scale_v.begin(), ws.scale_v.end(), T(0));
        for (int64_t j = 0; j < m; ++j) ws.scale_v[j] = p.b[j] > 0 ? T(1) : T(0);
        scaled = true;
        absorb = false;
        col_sums_ready = false;
      }
      if (!col_sums_ready) {
        for_columns(m, n, [&](int64_t begin, int64_t end) {
          k.weighted_col_sums(ws.kernel.data(), m_pad, n, ws.scale_u.data(), ws.sums.data(), begin, end);
        });
      }
      // The column update, with the check of its sums and the scalings' range in the same loop.
      const T col_floor = T(n) * (1 + kRange) * kFloor;
      const int flags = k.column_scalings(ws.sums.data(), p.b, ws.scale_v.data(), m, col_floor, kRange);
      outside_v = flags & kScalingOutside;
      if (flags & kScalingBad) {  // this whole iteration in the log domain, from the (trusted) row scalings
        log_domain = in_log_domain = true;
        sync_potentials();
      }
    }
    if (!in_log_domain) {
      T sum_scale_v = T(m) * kRange;
      if (outside_v) {
        sum_scale_v = 0;
        for (int64_t j = 0; j < m; ++j) sum_scale_v += ws.scale_v[j];
      }
      const T row_floor = (T(m) + sum_scale_v) * kFloor;
      if (it < opt.n_iters) {
        // The kernel is memory-bound: one pass over its rows gives the row
        // update and the column sums the next column update needs.
        if (row_blocks == 1) {  // one block: its column sums are the sums (adding them to zero is exact)
          std::fill(ws.sums.begin(), ws.sums.begin() + m_pad, T(0));
          k.scale_rows_col_sums(ws.kernel.data(), m_pad, ws.scale_v.data(), p.a, ws.scale_u.data(), ws.sums.data(), 0, n);
        } else {
          for_rows(row_blocks, kRowBlock * m_pad, [&](int64_t begin, int64_t end) {
            for (int64_t block = begin; block < end; ++block) {
              T* partial = ws.block_sums.data() + block * m_pad;
              std::fill(partial, partial + m_pad, T(0));
              k.scale_rows_col_sums(ws.kernel.data(), m_pad, ws.scale_v.data(), p.a, ws.scale_u.data(), partial,
                                    block * kRowBlock, std::min(n, (block + 1) * kRowBlock));
            }
          });
          std::fill(ws.sums.begin(), ws.sums.begin() + m, T(0));
          for (int64_t block = 0; block < row_blocks; ++block) {
            const T* partial = ws.block_sums.data() + block * m_pad;
            for (int64_t j = 0; j < m; ++j) ws.sums[j] += partial[j];
          }
        }
        col_sums_ready = true;
      } else {
        for_rows(n, m_pad, [&](int64_t begin, int64_t end) {
          k.dot_rows(ws.kernel.data(), m_pad, ws.scale_v.data(), ws.sums.data(), begin, end);
        });
        for (int64_t i = 0; i < n; ++i) ws.scale_u[i] = p.a[i] > 0 ? p.a[i] / ws.sums[i] : T(0);
      }
      // The row sums are a_i / scale_u_i: row_floor <= sum, and a normal scale_u_i (so sum < inf),
      // written without a division.
      const int flags = k.row_scalings_flags(ws.scale_u.data(), p.a, n, row_floor, kRange);
      const bool outside = flags & kScalingOutside;
      if (flags & kScalingBad) {  // redo the row update in the log domain from the (trusted) column scalings
        log_domain = true;
        sync_log_v();
        for_rows(n, m_pad, [&](int64_t begin, int64_t end) {
          k.lse_rows(ws.neg_c.data(), m_pad, ws.log_v.data(), ws.log_a.data(), ws.log_u.data(), begin, end);
        });
      } else {
        absorb = outside || outside_v;
      }
    } else {
      // The log-domain iteration (the first, and every one after a sum fell below its floor). Its
      // column update streams the rows of -C / eps with vector lanes along the columns, so no
      // transposed copy of the cost is built for one pass (at 1024 x 1024 that copy took longer
      // than the 49 scaling-domain iterations after it).
      for_columns(m, n, [&](int64_t begin, int64_t end) {
        k.lse_cols(ws.neg_c.data(), m_pad, n, ws.log_u.data(), ws.log_b.data(), ws.log_v.data(), begin, end);
      });
      for_rows(n, m_pad, [&](int64_t begin, int64_t end) {
        k.lse_rows(ws.neg_c.data(), m_pad, ws.log_v.data(), ws.log_a.data(), ws.log_u.data(), begin, end);
      });
    }
    if (with_tol && it % opt.check_every == 0) {
      if (scaled && !log_domain) sync_potentials();
      err = column_violation();
      measured = true;
      if (err <= tol) {
        iters = it;
        break;
      }
    }
  }
  if (scaled && !log_domain) sync_potentials();

  for_rows(n, m_pad, [&](int64_t begin, int64_t end) {
    // A row of the plan; the workspace's own one unless rows run on several threads.
    std::vector<T> own(parallel_rows ? m_pad : 0);
    T* row = parallel_rows ? own.data() : ws.plan_row.data();
    for (int64_t i = begin; i < end; ++i) {
      T* plan_row = p.plan ? p.plan + i * m : nullptr;
      if (ws.log_u[i] == neg_inf) {  // padded row: exactly zero
        if (plan_row) std::fill(plan_row, plan_row + m, T(0));
        ws.row_cost[i] = 0;
        continue;
      }
      k.exp_row(ws.neg_c.data() + i * m_pad, ws.log_u[i], ws.log_v.data(), row, m_pad);
      const scalar_t* c_row = p.C + i * m;
      double total = 0;
      for (int64_t j = 0; j < m; ++j) total += static_cast<double>(row[j]) * static_cast<double>(c_row[j]);
      if (plan_row) std::copy(row, row + m, plan_row);
      ws.row_cost[i] = total;
    }
  });
  if (!p.plan) {  // the row-costs operator: nothing else is returned
    std::copy(ws.row_cost.begin(), ws.row_cost.begin() + n, p.row_costs);
    return;
  }

  // Reductions over the whole problem in double: a float32 running sum over 4096 rows lost a
  // decimal digit against torch's pairwise sums.
  double cost = 0, dual_a = 0, dual_b = 0;
  for (int64_t i = 0; i < n; ++i) cost += ws.row_cost[i];
  for (int64_t i = 0; i < n; ++i) {
    p.f[i] = p.a[i] > 0 ? eps * ws.log_u[i] : T(0);
    dual_a += static_cast<double>(p.a[i]) * static_cast<double>(p.f[i]);
  }
  for (int64_t j = 0; j < m; ++j) {
    p.g[j] = p.b[j] > 0 ? eps * ws.log_v[j] : T(0);
    dual_b += static_cast<double>(p.b[j]) * static_cast<double>(p.g[j]);
  }
  const double reg_cost = dual_a + dual_b;
  if (!measured) {  // never checked: the column violation of the final plan, summed over rows in order
    std::fill(ws.col_sum.begin(), ws.col_sum.end(), T(0));
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < m; ++j) ws.col_sum[j] += p.plan[i * m + j];
    err = 0;
    for (int64_t j = 0; j < m; ++j) err += std::abs(ws.col_sum[j] - p.b[j]);
  }
  *p.cost = static_cast<T>(cost);
  *p.reg_cost = static_cast<T>(reg_cost);
  *p.n_iters = iters;
  *p.err = err;
}

using SolveResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Runs every problem of the batch; with `row_costs_only` the plan is neither
// stored nor returned (only `row_costs` [B, N] is filled).
SolveResult run_batch(const at::Tensor& C_in, const at::Tensor& a_in, const at::Tensor& b_in, double eps, int64_t n_iters,
                      double tol, int64_t check_every, bool row_costs_only) {
  check_sinkhorn_solve_args(C_in, a_in, b_in, eps, n_iters, check_every);
  const int64_t batch = C_in.size(0), n = C_in.size(1), m = C_in.size(2);
  const at::ScalarType compute = C_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor C = C_in.contiguous();
  const at::Tensor a = in_type(a_in, compute), b = in_type(b_in, compute);
  const auto options = C.options().dtype(compute);
  at::Tensor plan = row_costs_only ? at::Tensor() : at::empty({batch, n, m}, options);
  at::Tensor row_costs = row_costs_only ? at::empty({batch, n}, options) : at::Tensor();
  // The row-costs operator returns nothing else: its problems get null pointers for the other outputs.
  auto output = [&](at::IntArrayRef sizes, at::ScalarType type) {
    return row_costs_only ? at::Tensor() : at::empty(sizes, options.dtype(type));
  };
  at::Tensor f = output({batch, n}, compute), g = output({batch, m}, compute);
  at::Tensor cost = output({batch}, compute), reg_cost = output({batch}, compute), err = output({batch}, compute);
  at::Tensor iters = output({batch}, at::kLong);
  const Options opt{eps, n_iters, tol, check_every};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, C.scalar_type(), "sinkhorn_solve_cpu", [&] {
    using T = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    // A pointer into an output at `offset`, or null for an output the operator does not return.
    auto at_ = [](at::Tensor& t, int64_t offset) { return t.defined() ? t.mutable_data_ptr<T>() + offset : nullptr; };
    auto problem = [&](int64_t index) {
      return Problem<T, scalar_t>{C.const_data_ptr<scalar_t>() + index * n * m,
                                  a.const_data_ptr<T>() + index * n,
                                  b.const_data_ptr<T>() + index * m,
                                  at_(plan, index * n * m),
                                  at_(row_costs, index * n),
                                  at_(f, index * n),
                                  at_(g, index * m),
                                  at_(cost, index),
                                  at_(reg_cost, index),
                                  iters.defined() ? iters.mutable_data_ptr<int64_t>() + index : nullptr,
                                  at_(err, index)};
    };
    const int64_t threads = at::get_num_threads();
    const bool by_problem =
        batch >= threads && (batch % threads == 0 || batch >= 4 * threads || n * m <= 16384);
    if (by_problem) {
      at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
        Workspace<T> ws(n, m);
        for (int64_t index = begin; index < end; ++index) solve_problem(problem(index), ws, opt, false);
      });
    } else {
      Workspace<T> ws(n, m);
      for (int64_t index = 0; index < batch; ++index) solve_problem(problem(index), ws, opt, true);
    }
  });
  if (row_costs_only) return {row_costs, {}, {}, {}, {}, {}, {}};
  return {plan, f, g, cost, reg_cost, iters, err};
}

}  // namespace

SolveResult sinkhorn_solve_cpu(const at::Tensor& C, const at::Tensor& a, const at::Tensor& b, double eps, int64_t n_iters,
                               double tol, int64_t check_every) {
  return run_batch(C, a, b, eps, n_iters, tol, check_every, false);
}

at::Tensor sinkhorn_row_costs_cpu(const at::Tensor& C, const at::Tensor& a, const at::Tensor& b, double eps,
                                  int64_t n_iters, double tol, int64_t check_every) {
  return std::get<0>(run_batch(C, a, b, eps, n_iters, tol, check_every, true));
}

}  // namespace cpu
}  // namespace aplot_kernels

TORCH_LIBRARY_IMPL(aplot_kernels, CPU, m) {
  m.impl("sinkhorn_solve", &aplot_kernels::cpu::sinkhorn_solve_cpu);
  m.impl("sinkhorn_row_costs", &aplot_kernels::cpu::sinkhorn_row_costs_cpu);
}
