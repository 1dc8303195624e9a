// The value check of aplot_kernels._checks on CPU tensors: `aplot_kernels::first_nonfinite`.
//
// One call for all the tensors of an argument check, no reduction tensors allocated: at training
// sizes (a few rewards and embeddings) the check is then a small part of the call it guards.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cstdint>
#include <cstring>

namespace aplot_kernels {
namespace cpu {
namespace {

// Whether any of `count` values of a floating type with exponent bits `mask` (stored as `Bits`) is NaN
// or inf: all exponent bits set. Integer tests vectorise, and NaN needs no special case.
template <typename Bits>
bool any_nonfinite(const void* data, int64_t count, Bits mask) {
  std::atomic<bool> found(false);
  at::parallel_for(0, count, 1 << 16, [&](int64_t begin, int64_t end) {
    const unsigned char* bytes = static_cast<const unsigned char*>(data);
    int bad = 0;
    for (int64_t i = begin; i < end; ++i) {
      Bits bits;
      std::memcpy(&bits, bytes + i * sizeof(Bits), sizeof(Bits));
      bad |= static_cast<int>((bits & mask) == mask);
    }
    if (bad) found.store(true, std::memory_order_relaxed);
  });
  return found.load();
}

bool has_nonfinite(const at::Tensor& tensor) {
  const at::Tensor t = tensor.contiguous();
  const int64_t count = t.numel();
  const void* data = t.const_data_ptr();
  switch (t.scalar_type()) {
    case at::kDouble:
      return any_nonfinite<uint64_t>(data, count, 0x7ff0000000000000ULL);
    case at::kFloat:
      return any_nonfinite<uint32_t>(data, count, 0x7f800000U);
    case at::kHalf:
      return any_nonfinite<uint16_t>(data, count, 0x7c00U);
    case at::kBFloat16:
      return any_nonfinite<uint16_t>(data, count, 0x7f80U);
    default:
      TORCH_CHECK(false, "first_nonfinite: floating tensors only, got ", t.scalar_type());
  }
}

int64_t first_nonfinite_cpu(at::TensorList tensors) {
  for (size_t index = 0; index < tensors.size(); ++index) {
    TORCH_CHECK(tensors[index].device().is_cpu(), "first_nonfinite: CPU tensors only");
    if (has_nonfinite(tensors[index])) return static_cast<int64_t>(index);
  }
  return -1;
}

}  // namespace
}  // namespace cpu
}  // namespace aplot_kernels

TORCH_LIBRARY_IMPL(aplot_kernels, CPU, m) {
  m.impl("first_nonfinite", &aplot_kernels::cpu::first_nonfinite_cpu);
}
