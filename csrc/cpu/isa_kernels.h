// The CPU hot loops, written once and compiled once per instruction set.
//
// This header has no include guard on purpose: cpu_kernels.cpp includes it
// twice, once under `#pragma GCC target("avx2,fma")` with
// APLOT_ISA = avx2 and once for the baseline x86-64 / any other target with
// APLOT_ISA = generic, and picks one at run time. So the build needs no
// -march flag and the binary runs on any CPU of the architecture.
//
// The loops use GCC/Clang vector extensions (32-byte vectors: 8 floats or 4
// doubles) with an explicit exp, so the summation order is fixed by the code
// alone: results do not depend on the number of threads.
//
// Layout contract of every matrix handed in: rows are padded to a multiple of
// the vector width with -inf, and the vectors added to rows are padded with
// 0, so the loops need no tail handling.

#ifndef APLOT_ISA
#error "define APLOT_ISA before including isa_kernels.h"
#endif

namespace aplot_kernels {
namespace cpu {
namespace APLOT_ISA {

typedef float f32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));
typedef double f64x4 __attribute__((vector_size(32)));
typedef int64_t i64x4 __attribute__((vector_size(32)));

template <typename T>
struct Vec;
template <>
struct Vec<float> {
  typedef f32x8 type;
  static constexpr int width = 8;
};
template <>
struct Vec<double> {
  typedef f64x4 type;
  static constexpr int width = 4;
};

template <typename V, typename T>
inline V load(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V, typename T>
inline void store(T* p, V v) {
  std::memcpy(p, &v, sizeof(V));
}

template <typename V, typename T>
inline V splat(T x) {
  V v = {};
  return v + x;
}

// exp(x) to about 1 ulp; exactly 0 below the smallest normal (and for -inf),
// +inf above the largest finite result.
// Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2, then a polynomial in r
// (the Cephes expf coefficients) and 2^n built in the exponent bits.
inline f32x8 vexp(f32x8 x) {
  const float lo = -87.33654f, hi = 88.0f;
  const i32x8 underflow = x < lo;
  const i32x8 overflow = x > 88.72283f;
  x = x < lo ? splat<f32x8>(lo) : x;
  x = x > hi ? splat<f32x8>(hi) : x;
  // Adding 1.5 * 2^23 rounds to the nearest integer; its low mantissa bits are n.
  const float magic = 12582912.0f;
  const f32x8 t = x * 1.44269504088896341f + magic;
  const f32x8 n = t - magic;
  const i32x8 n_int = (i32x8)t - (i32x8)splat<f32x8>(magic);
  f32x8 r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  f32x8 p = splat<f32x8>(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const f32x8 scale = (f32x8)((n_int + 127) << 23);
  f32x8 result = p * scale;
  result = underflow ? splat<f32x8>(0.0f) : result;
  return overflow ? splat<f32x8>(std::numeric_limits<float>::infinity()) : result;
}

inline f64x4 vexp(f64x4 x) {
  const double lo = -708.3964185322641, hi = 709.0;
  const i64x4 underflow = x < lo;
  const i64x4 overflow = x > 709.782712893384;
  x = x < lo ? splat<f64x4>(lo) : x;
  x = x > hi ? splat<f64x4>(hi) : x;
  const double magic = 6755399441055744.0;  // 1.5 * 2^52
  const f64x4 t = x * 1.4426950408889634074 + magic;
  const f64x4 n = t - magic;
  const i64x4 n_int = (i64x4)t - (i64x4)splat<f64x4>(magic);
  f64x4 r = x - n * 6.93145751953125e-1;
  r = r - n * 1.42860682030941723212e-6;
  // Taylor series to r^13: the remainder is below 1e-17 relative for |r| <= ln2/2.
  f64x4 p = splat<f64x4>(1.0 / 6227020800.0);
  p = p * r + 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * (r * r) + r + 1.0;
  const f64x4 scale = (f64x4)((n_int + 1023) << 52);
  f64x4 result = p * scale;
  result = underflow ? splat<f64x4>(0.0) : result;
  return overflow ? splat<f64x4>(std::numeric_limits<double>::infinity()) : result;
}

template <typename T, typename V>
inline T horizontal_max(V v) {
  T m = v[0];
  for (int k = 1; k < Vec<T>::width; ++k) m = v[k] > m ? v[k] : m;
  return m;
}

template <typename T, typename V>
inline T horizontal_sum(V v) {
  // Pairwise, in a fixed order.
  T s[Vec<T>::width];
  for (int k = 0; k < Vec<T>::width; ++k) s[k] = v[k];
  for (int half = Vec<T>::width / 2; half > 0; half /= 2)
    for (int k = 0; k < half; ++k) s[k] += s[k + half];
  return s[0];
}

// For rows r in [row_begin, row_end) of `mat` (row stride `stride`):
//   lse_r = log sum_c exp(mat[r, c] + vec[c])   (max-shifted)
// and out[r] = log_w[r] - lse_r, or out[r] = lse_r when log_w is null.
// A row with log_w[r] = -inf (zero weight, padding) gets -inf without work.
template <typename T>
void lse_rows(const T* mat, int64_t stride, const T* vec, const T* log_w, T* out, int64_t row_begin, int64_t row_end) {
  typedef typename Vec<T>::type V;
  constexpr int W = Vec<T>::width;
  const T neg_inf = -std::numeric_limits<T>::infinity();
  const int64_t paired = stride - stride % (2 * W);
  for (int64_t r = row_begin; r < row_end; ++r) {
    if (log_w != nullptr && log_w[r] == neg_inf) {
      out[r] = neg_inf;
      continue;
    }
    const T* row = mat + r * stride;
    V m0 = splat<V>(neg_inf), m1 = m0;
    int64_t c = 0;
    for (; c < paired; c += 2 * W) {
      const V x0 = load<V>(row + c) + load<V>(vec + c);
      const V x1 = load<V>(row + c + W) + load<V>(vec + c + W);
      m0 = x0 > m0 ? x0 : m0;
      m1 = x1 > m1 ? x1 : m1;
    }
    for (; c < stride; c += W) {
      const V x0 = load<V>(row + c) + load<V>(vec + c);
      m0 = x0 > m0 ? x0 : m0;
    }
    const T m = horizontal_max<T>(m0 > m1 ? m0 : m1);
    if (m == neg_inf) {  // no mass reaches this row: keep it out of the arithmetic
      out[r] = log_w != nullptr ? -neg_inf : neg_inf;
      continue;
    }
    V s0 = splat<V>(T(0)), s1 = s0;
    c = 0;
    for (; c < paired; c += 2 * W) {
      s0 += vexp(load<V>(row + c) + load<V>(vec + c) - m);
      s1 += vexp(load<V>(row + c + W) + load<V>(vec + c + W) - m);
    }
    for (; c < stride; c += W) s0 += vexp(load<V>(row + c) + load<V>(vec + c) - m);
    const T lse = std::log(horizontal_sum<T>(s0 + s1)) + m;
    out[r] = log_w != nullptr ? log_w[r] - lse : lse;
  }
}

// Column-wise log-sum-exp, for columns l in [col_begin, col_end):
//   lse_l = log sum_k exp(mat[k, l] + vec[k])   over rows k < rows (max-shifted)
// and out[l] = log_w[l] - lse_l (-inf where log_w[l] = -inf), or out[l] =
// lse_l when log_w is null. Vector lanes run along l, so there is no
// horizontal reduction and every lane sums its rows in order; rows with
// vec[k] = -inf (zero weight) are skipped. col_begin must be a multiple of
// the vector width; mat has row stride `stride` >= the padded col_end.
template <typename T>
void lse_cols(const T* mat, int64_t stride, int64_t rows, const T* vec, const T* log_w, T* out, int64_t col_begin,
              int64_t col_end) {
  typedef typename Vec<T>::type V;
  constexpr int W = Vec<T>::width;
  constexpr int kVectors = 4;  // columns per block: 4 vectors of accumulators
  const T neg_inf = -std::numeric_limits<T>::infinity();
  for (int64_t l0 = col_begin; l0 < col_end; l0 += kVectors * W) {
    const int count = static_cast<int>(std::min<int64_t>(kVectors, (col_end - l0 + W - 1) / W));
    V m[kVectors], s[kVectors];
    for (int q = 0; q < kVectors; ++q) m[q] = splat<V>(neg_inf), s[q] = splat<V>(T(0));
    for (int64_t k = 0; k < rows; ++k) {
      const T shift = vec[k];
      if (shift == neg_inf) continue;
      const T* row = mat + k * stride + l0;
      for (int q = 0; q < count; ++q) {
        const V x = load<V>(row + q * W) + shift;
        m[q] = x > m[q] ? x : m[q];
      }
    }
    for (int64_t k = 0; k < rows; ++k) {
      const T shift = vec[k];
      if (shift == neg_inf) continue;
      const T* row = mat + k * stride + l0;
      for (int q = 0; q < count; ++q) s[q] += vexp(load<V>(row + q * W) + shift - m[q]);
    }
    for (int q = 0; q < count; ++q) {
      for (int lane = 0; lane < W; ++lane) {
        const int64_t l = l0 + q * W + lane;
        if (l >= col_end) break;
        const T lse = std::log(s[q][lane]) + m[q][lane];
        if (log_w == nullptr) {
          out[l] = lse;
        } else {
          out[l] = log_w[l] == neg_inf ? neg_inf : log_w[l] - lse;
        }
      }
    }
  }
}

// sum_c row[c] * vec[c], in the same order wherever it is used.
template <typename T>
inline T row_dot(const T* row, const T* vec, int64_t stride) {
  typedef typename Vec<T>::type V;
  constexpr int W = Vec<T>::width;
  const int64_t paired = stride - stride % (2 * W);
  V s0 = splat<V>(T(0)), s1 = s0;
  int64_t c = 0;
  for (; c < paired; c += 2 * W) {
    s0 += load<V>(row + c) * load<V>(vec + c);
    s1 += load<V>(row + c + W) * load<V>(vec + c + W);
  }
  for (; c < stride; c += W) s0 += load<V>(row + c) * load<V>(vec + c);
  return horizontal_sum<T>(s0 + s1);
}

// out[r] = sum_c mat[r, c] * vec[c] for rows r in [row_begin, row_end).
template <typename T>
void dot_rows(const T* mat, int64_t stride, const T* vec, T* out, int64_t row_begin, int64_t row_end) {
  for (int64_t r = row_begin; r < row_end; ++r) out[r] = row_dot(mat + r * stride, vec, stride);
}

// For rows r in [row_begin, row_end), in order:
//   row_scale[r] = weights[r] / sum_c mat[r, c] * vec[c]   (0 where weights[r] <= 0)
//   col_sums[c] += row_scale[r] * mat[r, c]                 for c < stride (rows with scale 0 skipped)
// Each row is read from memory once for both (the second read hits the cache).
template <typename T>
void scale_rows_col_sums(const T* mat, int64_t stride, const T* vec, const T* weights, T* row_scale, T* col_sums,
                         int64_t row_begin, int64_t row_end) {
  typedef typename Vec<T>::type V;
  constexpr int W = Vec<T>::width;
  constexpr int kRows = 4;  // rows added per read-modify-write of col_sums
  for (int64_t r0 = row_begin; r0 < row_end; r0 += kRows) {
    const T* rows[kRows];
    T scales[kRows];
    int count = 0;
    for (int64_t r = r0; r < std::min(row_end, r0 + kRows); ++r) {
      const T* row = mat + r * stride;
      const T scale = weights[r] > 0 ? weights[r] / row_dot(row, vec, stride) : T(0);
      row_scale[r] = scale;
      if (scale != T(0)) rows[count] = row, scales[count++] = scale;
    }
    if (count == kRows) {
      for (int64_t c = 0; c < stride; c += W) {
        V acc = load<V>(col_sums + c);
        acc += load<V>(rows[0] + c) * scales[0];
        acc += load<V>(rows[1] + c) * scales[1];
        acc += load<V>(rows[2] + c) * scales[2];
        acc += load<V>(rows[3] + c) * scales[3];
        store(col_sums + c, acc);
      }
    } else {
      for (int q = 0; q < count; ++q)
        for (int64_t c = 0; c < stride; c += W)
          store(col_sums + c, load<V>(col_sums + c) + load<V>(rows[q] + c) * scales[q]);
    }
  }
}

// out[l] = sum_k weights[k] * mat[k, l] for columns l in [col_begin, col_end)
// (col_begin a multiple of the vector width); rows with weight 0 are skipped.
template <typename T>
void weighted_col_sums(const T* mat, int64_t stride, int64_t rows, const T* weights, T* out, int64_t col_begin,
                       int64_t col_end) {
  typedef typename Vec<T>::type V;
  constexpr int W = Vec<T>::width;
  constexpr int kVectors = 4;
  for (int64_t l0 = col_begin; l0 < col_end; l0 += kVectors * W) {
    const int count = static_cast<int>(std::min<int64_t>(kVectors, (col_end - l0 + W - 1) / W));
    V s[kVectors];
    for (int q = 0; q < kVectors; ++q) s[q] = splat<V>(T(0));
    for (int64_t k = 0; k < rows; ++k) {
      const T w = weights[k];
      if (w == T(0)) continue;
      const T* row = mat + k * stride + l0;
      for (int q = 0; q < count; ++q) s[q] += load<V>(row + q * W) * w;
    }
    for (int q = 0; q < count; ++q)
      for (int lane = 0; lane < W && l0 + q * W + lane < col_end; ++lane) out[l0 + q * W + lane] = s[q][lane];
  }
}

// out[c] = exp(row[c] + shift + vec[c]) for c < stride (the transport plan row
// exp(u_i + v_j - C_ij / eps) when row = -C_i. / eps, shift = u_i, vec = v).
template <typename T>
void exp_row(const T* row, T shift, const T* vec, T* out, int64_t stride) {
  typedef typename Vec<T>::type V;
  constexpr int W = Vec<T>::width;
  for (int64_t c = 0; c < stride; c += W) {
    // (shift + vec) + row: the reference's order, (log_u + log_v) - C / eps.
    store(out + c, vexp((load<V>(vec + c) + shift) + load<V>(row + c)));
  }
}

// The APLOT epilogue on one row, in place over the similarities s[0, count):
//   s[j] <- alpha * sigmoid(-|r_i - q[j]| / temperature) + coef * (1 + s[j]).
template <typename T>
void aplot_epilogue_row(T* s, T r_i, const T* q, T alpha, T temperature, T coef, T offset, int64_t count) {
  typedef typename Vec<T>::type V;
  constexpr int W = Vec<T>::width;
  int64_t j = 0;
  for (; j + W <= count; j += W) {
    V delta = r_i - load<V>(q + j);
    delta = delta < T(0) ? -delta : delta;
    const V gap = T(1) / (T(1) + vexp(delta / temperature));
    store(s + j, alpha * gap + coef * (offset + load<V>(s + j)));
  }
  for (; j < count; ++j) {
    const T delta = std::abs(r_i - q[j]);
    const T gap = T(1) / (T(1) + std::exp(delta / temperature));
    s[j] = alpha * gap + coef * (offset + s[j]);
  }
}

// Instantiated here, inside the instruction-set region of the includer.
template void lse_rows<float>(const float*, int64_t, const float*, const float*, float*, int64_t, int64_t);
template void lse_rows<double>(const double*, int64_t, const double*, const double*, double*, int64_t, int64_t);
template void lse_cols<float>(const float*, int64_t, int64_t, const float*, const float*, float*, int64_t, int64_t);
template void lse_cols<double>(const double*, int64_t, int64_t, const double*, const double*, double*, int64_t, int64_t);
template void dot_rows<float>(const float*, int64_t, const float*, float*, int64_t, int64_t);
template void dot_rows<double>(const double*, int64_t, const double*, double*, int64_t, int64_t);
template void scale_rows_col_sums<float>(const float*, int64_t, const float*, const float*, float*, float*, int64_t,
                                         int64_t);
template void scale_rows_col_sums<double>(const double*, int64_t, const double*, const double*, double*, double*,
                                          int64_t, int64_t);
template void weighted_col_sums<float>(const float*, int64_t, int64_t, const float*, float*, int64_t, int64_t);
template void weighted_col_sums<double>(const double*, int64_t, int64_t, const double*, double*, int64_t, int64_t);
template void exp_row<float>(const float*, float, const float*, float*, int64_t);
template void exp_row<double>(const double*, double, const double*, double*, int64_t);
template void aplot_epilogue_row<float>(float*, float, const float*, float, float, float, float, int64_t);
template void aplot_epilogue_row<double>(double*, double, const double*, double, double, double, double, int64_t);

// sum_d (scale x[d])^2 and max_d |x[d]| of one row of `width` values (no padding needed), in one read.
template <typename T>
T sum_of_squares(const T* x, int64_t width, T scale, T* peak) {
  typedef typename Vec<T>::type V;
  constexpr int W = Vec<T>::width;
  V squares = splat<V>(T(0)), peaks = squares;
  int64_t d = 0;
  for (; d + W <= width; d += W) {
    const V v = load<V>(x + d);
    const V scaled = v * scale;
    squares += scaled * scaled;
    const V magnitude = v < T(0) ? -v : v;
    peaks = magnitude > peaks ? magnitude : peaks;
  }
  T total = horizontal_sum<T>(squares), largest = horizontal_max<T>(peaks);
  for (; d < width; ++d) {
    total += (x[d] * scale) * (x[d] * scale);
    largest = std::max(largest, std::abs(x[d]));
  }
  *peak = largest;
  return total;
}
template float sum_of_squares<float>(const float*, int64_t, float, float*);
template double sum_of_squares<double>(const double*, int64_t, double, double*);

// out[j] = <sx x, sy[j] y_j> for the `count` rows y_j = y + j * width (no padding needed).
template <typename T>
void scaled_dots(const T* x, T sx, const T* y, const T* sy, int64_t width, int64_t count, T* out) {
  typedef typename Vec<T>::type V;
  constexpr int W = Vec<T>::width;
  for (int64_t j = 0; j < count; ++j) {
    const T* y_row = y + j * width;
    const T sy_j = sy[j];
    V acc = splat<V>(T(0));
    int64_t d = 0;
    for (; d + W <= width; d += W) acc += (load<V>(x + d) * sx) * (load<V>(y_row + d) * sy_j);
    T total = horizontal_sum<T>(acc);
    for (; d < width; ++d) total += (x[d] * sx) * (y_row[d] * sy_j);
    out[j] = total;
  }
}
template void scaled_dots<float>(const float*, float, const float*, const float*, int64_t, int64_t, float*);
template void scaled_dots<double>(const double*, double, const double*, const double*, int64_t, int64_t, double*);

template <typename V>
inline bool any_lane(V mask) {
  for (int k = 0; k < static_cast<int>(sizeof(V) / sizeof(mask[0])); ++k)
    if (mask[k]) return true;
  return false;
}

// The column update of the scaling domain, for j < count: scale[j] = weights[j] / sums[j] (0 where
// weights[j] <= 0). Flags, over positive weights: kScalingBad for a sum below `floor` or above the
// largest finite value, or a scale that is not a normal finite number; kScalingOutside for a scale
// outside (1 / range, range). NaN fails every comparison, hence counts as bad.
template <typename T>
int column_scalings(const T* sums, const T* weights, T* scale, int64_t count, T floor, T range) {
  typedef typename Vec<T>::type V;
  constexpr int W = Vec<T>::width;
  constexpr T kMin = std::numeric_limits<T>::min(), kMax = std::numeric_limits<T>::max();
  const T low = T(1) / range;
  typedef decltype(V{} < V{}) M;
  M bad = {}, outside = {};
  int64_t j = 0;
  for (; j + W <= count; j += W) {
    const V sum = load<V>(sums + j), weight = load<V>(weights + j);
    const M positive = weight > T(0);
    const V value = positive ? weight / sum : splat<V>(T(0));
    bad |= positive & ~((sum >= floor) & (sum <= kMax) & (value >= kMin) & (value <= kMax));
    outside |= positive & ~((value < range) & (value > low));
    store(scale + j, value);
  }
  int flags = (any_lane(bad) ? kScalingBad : 0) | (any_lane(outside) ? kScalingOutside : 0);
  for (; j < count; ++j) {
    const T sum = sums[j], weight = weights[j];
    const bool positive = weight > 0;
    const T value = positive ? weight / sum : T(0);
    if (positive && !(sum >= floor && sum <= kMax && value >= kMin && value <= kMax)) flags |= kScalingBad;
    if (positive && !(value < range && value > low)) flags |= kScalingOutside;
    scale[j] = value;
  }
  return flags;
}
template int column_scalings<float>(const float*, const float*, float*, int64_t, float, float);
template int column_scalings<double>(const double*, const double*, double*, int64_t, double, double);

// The check of a row update, for i < count, over positive weights: kScalingBad where the row sum
// weights[i] / scale[i] is below `floor` (scale * floor > weight, written without a division) or the
// scale is below the smallest normal number; kScalingOutside for a scale outside (1 / range, range).
template <typename T>
int row_scalings_flags(const T* scale, const T* weights, int64_t count, T floor, T range) {
  typedef typename Vec<T>::type V;
  constexpr int W = Vec<T>::width;
  constexpr T kMin = std::numeric_limits<T>::min();
  const T low = T(1) / range;
  typedef decltype(V{} < V{}) M;
  M bad = {}, outside = {};
  int64_t i = 0;
  for (; i + W <= count; i += W) {
    const V value = load<V>(scale + i), weight = load<V>(weights + i);
    const M positive = weight > T(0);
    bad |= positive & ~((value * floor <= weight) & (value >= kMin));
    outside |= positive & ~((value < range) & (value > low));
  }
  int flags = (any_lane(bad) ? kScalingBad : 0) | (any_lane(outside) ? kScalingOutside : 0);
  for (; i < count; ++i) {
    const T value = scale[i], weight = weights[i];
    const bool positive = weight > 0;
    if (positive && !(value * floor <= weight && value >= kMin)) flags |= kScalingBad;
    if (positive && !(value < range && value > low)) flags |= kScalingOutside;
  }
  return flags;
}
template int row_scalings_flags<float>(const float*, const float*, int64_t, float, float);
template int row_scalings_flags<double>(const double*, const double*, int64_t, double, double);

}  // namespace APLOT_ISA
}  // namespace cpu
}  // namespace aplot_kernels
