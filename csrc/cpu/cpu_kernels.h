// The CPU hot loops for the instruction set this machine has (see isa_kernels.h).
#pragma once

#include <cstdint>

namespace aplot_kernels {
namespace cpu {

template <typename T>
struct Kernels {
  // out[r] = log_w[r] - log sum_c exp(mat[r, c] + vec[c]) (or the log-sum-exp itself when log_w is null).
  void (*lse_rows)(const T* mat, int64_t stride, const T* vec, const T* log_w, T* out, int64_t row_begin, int64_t row_end);
  // out[l] = log_w[l] - log sum_k exp(mat[k, l] + vec[k]) for l in [col_begin, col_end) (or the log-sum-exp itself).
  void (*lse_cols)(const T* mat, int64_t stride, int64_t rows, const T* vec, const T* log_w, T* out, int64_t col_begin,
                   int64_t col_end);
  // out[r] = sum_c mat[r, c] * vec[c].
  void (*dot_rows)(const T* mat, int64_t stride, const T* vec, T* out, int64_t row_begin, int64_t row_end);
  // row_scale[r] = weights[r] / sum_c mat[r, c] * vec[c] (0 where weights[r] <= 0), and
  // col_sums[c] += row_scale[r] * mat[r, c] for c < stride, rows in order: one pass over the rows.
  void (*scale_rows_col_sums)(const T* mat, int64_t stride, const T* vec, const T* weights, T* row_scale, T* col_sums,
                              int64_t row_begin, int64_t row_end);
  // out[l] = sum_k weights[k] * mat[k, l].
  void (*weighted_col_sums)(const T* mat, int64_t stride, int64_t rows, const T* weights, T* out, int64_t col_begin,
                            int64_t col_end);
  // out[c] = exp(shift + vec[c] + row[c]).
  void (*exp_row)(const T* row, T shift, const T* vec, T* out, int64_t stride);
  // s[j] <- alpha * sigmoid(-|r_i - q[j]| / temperature) + coef * (offset + s[j]).
  void (*aplot_epilogue_row)(T* s, T r_i, const T* q, T alpha, T temperature, T coef, T offset, int64_t count);
  // sum_d (scale x[d])^2 over `width` values; *peak = max_d |x[d]|.
  T (*sum_of_squares)(const T* x, int64_t width, T scale, T* peak);
  // out[j] = <sx x, sy[j] y_j> for the `count` rows y_j = y + j * width.
  void (*scaled_dots)(const T* x, T sx, const T* y, const T* sy, int64_t width, int64_t count, T* out);
  // Sinkhorn's scaling domain: the column update scale[j] = weights[j] / sums[j] with the checks of its
  // sums and scalings, and the checks of a row update. Both return kScalingBad | kScalingOutside flags.
  int (*column_scalings)(const T* sums, const T* weights, T* scale, int64_t count, T floor, T range);
  int (*row_scalings_flags)(const T* scale, const T* weights, int64_t count, T floor, T range);
};

constexpr int kScalingBad = 1;      // a sum or scaling that cannot be trusted: back to the log domain
constexpr int kScalingOutside = 2;  // a scaling outside (1 / range, range): absorb it into the potentials

// Kernels for the best instruction set of this CPU (chosen once).
template <typename T>
const Kernels<T>& kernels();

// Name of that instruction set ("avx2" or "generic"), for diagnostics.
const char* isa_name();

// Vector width in elements of T: every padded row length is a multiple of it.
template <typename T>
constexpr int64_t vector_width() {
  return 32 / sizeof(T);
}

}  // namespace cpu
}  // namespace aplot_kernels
