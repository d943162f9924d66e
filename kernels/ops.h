// Helpers shared by the CPU operator implementations of the cg4ctr native library (kernels/*.cpp).
// The schemas are in schema.cpp; this header has only argument checks and dtype plumbing.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <string>

namespace cg4ctr {

inline bool is_step_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// A step op's float input: float32/float16/bfloat16, contiguous, on the expected device.
inline void check_float_input(const at::Tensor& t, const char* op, const char* name, const at::Device& device) {
  TORCH_CHECK(is_step_float(t.scalar_type()), op, ": ", name, " must be float32, float16 or bfloat16, got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == device, op, ": ", name, " is on ", t.device(), ", sample on ", device);
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

inline std::string shape_str(const at::Tensor& t) {
  std::string s = "(";
  for (int64_t i = 0; i < t.dim(); ++i) {
    if (i) s += ", ";
    s += std::to_string(t.size(i));
  }
  return s + ")";
}

}  // namespace cg4ctr
