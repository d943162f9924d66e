// CPU kernels of the product composite ops (schemas in schema.cpp): the arithmetic of
// cg4ctr_fast/imaging.py `composite` (8-bit) and `composite_float`, given the paste weights that
// imaging._paste_weights computes (alpha, or 255 without one, where the mask keeps the product; 0 on the
// background).
#include "ops.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>

namespace cg4ctr {
namespace {

constexpr int64_t kGrainPixels = 1 << 14;

void check_composite(const char* op, const at::Tensor& original, const at::Tensor& generated,
                     const at::Tensor& weights, at::ScalarType generated_dtype) {
  TORCH_CHECK(original.device().is_cpu() && generated.device().is_cpu() && weights.device().is_cpu(), op,
              ": the CPU kernel got tensors on ", original.device(), ", ", generated.device(), ", ",
              weights.device());
  TORCH_CHECK(original.scalar_type() == at::kByte && weights.scalar_type() == at::kByte, op,
              ": original and weights must be uint8, got ", original.scalar_type(), " and ", weights.scalar_type());
  TORCH_CHECK(generated.scalar_type() == generated_dtype, op, ": generated must be ", generated_dtype, ", got ",
              generated.scalar_type());
  TORCH_CHECK(original.dim() >= 3 && original.size(-1) == 3, op, ": original must be [..., H, W, 3], got ",
              shape_str(original));
  TORCH_CHECK(generated.sizes() == original.sizes(), op, ": generated is ", shape_str(generated),
              ", expected the original's shape ", shape_str(original));
  TORCH_CHECK(weights.sizes() == original.sizes().slice(0, original.dim() - 1), op, ": weights is ",
              shape_str(weights), ", expected the original's shape without the channel axis");
  TORCH_CHECK(original.is_contiguous() && generated.is_contiguous() && weights.is_contiguous(), op,
              ": original, generated and weights must be contiguous");
}

// out = (C*a + G*(255 - a) + 127) // 255 per channel, in integers (exact; no ties since 255 is odd).
at::Tensor composite_cpu(const at::Tensor& original, const at::Tensor& generated, const at::Tensor& weights) {
  check_composite("composite", original, generated, weights, at::kByte);
  at::Tensor out = at::empty_like(original);
  const uint8_t* c = original.data_ptr<uint8_t>();
  const uint8_t* g = generated.data_ptr<uint8_t>();
  const uint8_t* w = weights.data_ptr<uint8_t>();
  uint8_t* o = out.data_ptr<uint8_t>();
  at::parallel_for(0, weights.numel(), kGrainPixels, [&](int64_t begin, int64_t end) {
    for (int64_t px = begin; px < end; ++px) {
      const uint32_t a = w[px];
      for (int64_t ch = 3 * px; ch < 3 * px + 3; ++ch) {
        o[ch] = static_cast<uint8_t>((c[ch] * a + g[ch] * (255u - a) + 127u) / 255u);
      }
    }
  });
  return out;
}

// out = c*α + G*(1 - α) in float32 with c = float(C) / 255, α = float(a) / 255 (imaging's numpy order).
at::Tensor composite_float_cpu(const at::Tensor& original, const at::Tensor& generated, const at::Tensor& weights) {
  check_composite("composite_float", original, generated, weights, at::kFloat);
  at::Tensor out = at::empty_like(generated);
  const uint8_t* c = original.data_ptr<uint8_t>();
  const float* g = generated.data_ptr<float>();
  const uint8_t* w = weights.data_ptr<uint8_t>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, weights.numel(), kGrainPixels, [&](int64_t begin, int64_t end) {
    for (int64_t px = begin; px < end; ++px) {
      const float a = static_cast<float>(w[px]) / 255.0f;
      const float rest = 1.0f - a;
      for (int64_t ch = 3 * px; ch < 3 * px + 3; ++ch) {
        const float cf = static_cast<float>(c[ch]) / 255.0f;
        o[ch] = cf * a + g[ch] * rest;
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(cg4ctr, CPU, m) {
  m.impl("composite", &composite_cpu);
  m.impl("composite_float", &composite_float_cpu);
}

}  // namespace cg4ctr
