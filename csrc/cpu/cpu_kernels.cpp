// Compiles the hot loops of isa_kernels.h for AVX2+FMA and for the baseline,
// and picks one at run time from what the CPU reports.
#include "cpu_kernels.h"

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define APLOT_HAVE_AVX2_BUILD 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define APLOT_ISA avx2
#include "isa_kernels.h"
#undef APLOT_ISA
#pragma GCC pop_options
#endif

#define APLOT_ISA generic
#include "isa_kernels.h"
#undef APLOT_ISA

namespace aplot_kernels {
namespace cpu {
namespace {

// APLOT_KERNELS_CPU_ISA=generic (read once) selects the portable loops on any CPU, so that
// they are tested on machines that would pick AVX2.
bool generic_forced() {
  const char* isa = std::getenv("APLOT_KERNELS_CPU_ISA");
  return isa != nullptr && std::strcmp(isa, "generic") == 0;
}

bool use_avx2() {
#ifdef APLOT_HAVE_AVX2_BUILD
  static const bool supported =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && !generic_forced();
  return supported;
#else
  return false;
#endif
}

template <typename T>
Kernels<T> make_generic() {
  return {&generic::lse_rows<T>, &generic::lse_cols<T>, &generic::dot_rows<T>, &generic::scale_rows_col_sums<T>, &generic::weighted_col_sums<T>, &generic::exp_row<T>, &generic::aplot_epilogue_row<T>,
          &generic::sum_of_squares<T>, &generic::scaled_dots<T>,
          &generic::column_scalings<T>, &generic::row_scalings_flags<T>};
}

#ifdef APLOT_HAVE_AVX2_BUILD
template <typename T>
Kernels<T> make_avx2() {
  return {&avx2::lse_rows<T>, &avx2::lse_cols<T>, &avx2::dot_rows<T>, &avx2::scale_rows_col_sums<T>, &avx2::weighted_col_sums<T>, &avx2::exp_row<T>, &avx2::aplot_epilogue_row<T>,
          &avx2::sum_of_squares<T>, &avx2::scaled_dots<T>,
          &avx2::column_scalings<T>, &avx2::row_scalings_flags<T>};
}
#endif

template <typename T>
Kernels<T> make_best() {
#ifdef APLOT_HAVE_AVX2_BUILD
  if (use_avx2()) return make_avx2<T>();
#endif
  return make_generic<T>();
}

}  // namespace

template <typename T>
const Kernels<T>& kernels() {
  static const Kernels<T> best = make_best<T>();
  return best;
}

template const Kernels<float>& kernels<float>();
template const Kernels<double>& kernels<double>();

const char* isa_name() {
  return use_avx2() ? "avx2" : "generic";
}

}  // namespace cpu
}  // namespace aplot_kernels
