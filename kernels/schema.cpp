// Operator schemas of the cg4ctr native library: the one TORCH_LIBRARY(cg4ctr, ...) block.
//
// The CPU kernels (step_ops.cpp, composite.cpp) and the CUDA kernels (step_ops.cu, composite.cu) only
// register implementations (TORCH_LIBRARY_IMPL(cg4ctr, CPU/CUDA, m)); a namespace may have one
// TORCH_LIBRARY block, so every schema lives here.
//
// Step ops: one elementwise pass = CFG combine + scheduler update + optional 4-channel inpainting blend,
// the math of cg4ctr_fast/kernels/reference.py (<name>_ref) with the layout of _layout.py:
//   sample (B, C, *spatial); model_output (2B, ...) = cat([uncond, text]) when guidance_scale is given,
//   else (B, ...); mask (Bm, 1, *spatial), Bm in {1, B, 2B} (2B: the first B are used);
//   image_latents / noise (1 or B, C, *spatial); noise None = the last step (blend target = image_latents).
//   Inputs are contiguous (the Python wrapper makes them so); `out` has sample's shape and dtype,
//   dpm_solver_step's `x0_out` has sample's shape and model_output's dtype. `float` is a double on the
//   C++ side; the kernels round every scalar to fp32 before use, as torch does with a Python scalar.
// Composite ops: original uint8 [..., H, W, 3]; generated uint8 [..., H, W, 3] (composite) or float32 in
//   [0, 1] (composite_float); weights uint8 [..., H, W] (255 = product, 0 = background, else alpha).
#include <torch/library.h>

TORCH_LIBRARY(cg4ctr, m) {
  m.def(
      "ddim_step(Tensor model_output, Tensor sample, float? guidance_scale, float x0_sample, float x0_model, "
      "float eps_sample, float eps_model, float prev_x0, float prev_eps, float? clip_range, Tensor? mask, "
      "Tensor? image_latents, Tensor? noise, float init_image, float init_noise, Tensor(a!) out) -> ()");
  m.def(
      "euler_step(Tensor model_output, Tensor sample, float? guidance_scale, float x0_sample, float x0_model, "
      "float sigma_hat, float dt, Tensor? mask, Tensor? image_latents, Tensor? noise, float init_image, "
      "float init_noise, Tensor(a!) out) -> ()");
  m.def(
      "dpm_solver_step(Tensor model_output, Tensor sample, float? guidance_scale, float x0_sample, "
      "float x0_model, float coef_sample, float coef_x0, float coef_diff, Tensor? prev_x0, Tensor? mask, "
      "Tensor? image_latents, Tensor? noise, float init_image, float init_noise, Tensor(a!) out, "
      "Tensor(b!) x0_out) -> ()");
  m.def(
      "lcm_step(Tensor model_output, Tensor sample, float? guidance_scale, float x0_sample, float x0_model, "
      "float c_skip, float c_out, float prev_denoised, float prev_noise, Tensor? step_noise, float? clip_range, "
      "Tensor? mask, Tensor? image_latents, Tensor? noise, float init_image, float init_noise, "
      "Tensor(a!) out) -> ()");
  m.def(
      "tcd_step(Tensor model_output, Tensor sample, float? guidance_scale, float x0_sample, float x0_model, "
      "float eps_sample, float eps_model, float noised_x0, float noised_eps, float prev_noised, "
      "float prev_noise, Tensor? step_noise, Tensor? mask, Tensor? image_latents, Tensor? noise, "
      "float init_image, float init_noise, Tensor(a!) out) -> ()");
  m.def("composite(Tensor original, Tensor generated, Tensor weights) -> Tensor");
  m.def("composite_float(Tensor original, Tensor generated, Tensor weights) -> Tensor");
}
