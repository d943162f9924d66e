// CPU kernels of the fused denoising step ops (schemas in schema.cpp).
//
// Each op is one pass over the latents: CFG combine + scheduler update + optional inpainting blend, with
// the math and operation order of cg4ctr_fast/kernels/reference.py (<name>_ref). Every value is computed
// in fp32 with the same separate multiplies and adds as the reference's unfused torch ops (the library is
// compiled with -ffp-contract=off so none of them is fused into an FMA), and each double scalar is
// rounded to fp32 once, as torch rounds a Python scalar applied to an fp32 tensor. The fp32 results are
// therefore those of the reference bit for bit; stores round to the output dtype (round to nearest even,
// as Tensor.copy_ does).
//
// Work split: (batch item x chunk of kTask elements) tasks under at::parallel_for, so a batch of one also
// runs on every thread; inside a task, tiles of kTile elements are read as fp32 (float32 inputs in place,
// float16 / bfloat16 converted into per-thread buffers) and processed with at::vec::Vectorized<float>.
#include "ops.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>

namespace cg4ctr {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kTile = 1024;   // elements per fp32 tile (a multiple of Vec::size())
constexpr int64_t kTask = 16384;  // elements of one batch item per parallel task
constexpr int64_t kGrainTasks = 2;  // at least 2 * kTask elements per thread

// ---- dtype plumbing -------------------------------------------------------------------------

// n elements from element offset `off` of a float32/float16/bfloat16 buffer, as fp32: a pointer into the
// tensor for float32 (no copy), else `buf` filled by exact conversion.
const float* read_f32(const void* base, at::ScalarType t, int64_t off, int64_t n, float* buf) {
  if (t == at::kFloat) return static_cast<const float*>(base) + off;
  if (t == at::kHalf) {
    const c10::Half* p = static_cast<const c10::Half*>(base) + off;
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(p[i]);
  } else {
    const c10::BFloat16* p = static_cast<const c10::BFloat16*>(base) + off;
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(p[i]);
  }
  return buf;
}

// Copies n fp32 values into a float16/bfloat16 buffer at element offset `off` (round to nearest even).
void write_f32(void* base, at::ScalarType t, int64_t off, int64_t n, const float* src) {
  if (t == at::kHalf) {
    c10::Half* p = static_cast<c10::Half*>(base) + off;
    for (int64_t i = 0; i < n; ++i) p[i] = c10::Half(src[i]);
  } else if (t == at::kBFloat16) {
    c10::BFloat16* p = static_cast<c10::BFloat16*>(base) + off;
    for (int64_t i = 0; i < n; ++i) p[i] = c10::BFloat16(src[i]);
  } else {
    std::copy(src, src + n, static_cast<float*>(base) + off);
  }
}

// v rounded to dtype t and back (DPM uses the stored, rounded data prediction).
inline Vec round_through(const Vec& v, at::ScalarType t) {
  if (t == at::kFloat) return v;
  alignas(64) float tmp[Vec::size()];
  v.store(tmp);
  if (t == at::kHalf) {
    for (int64_t i = 0; i < Vec::size(); ++i) tmp[i] = static_cast<float>(c10::Half(tmp[i]));
  } else {
    for (int64_t i = 0; i < Vec::size(); ++i) tmp[i] = static_cast<float>(c10::BFloat16(tmp[i]));
  }
  return Vec::loadu(tmp);
}

inline Vec ld(const float* p, int64_t i, int64_t c) {
  return c == Vec::size() ? Vec::loadu(p + i) : Vec::loadu(p + i, c);
}

inline void st(float* p, int64_t i, int64_t c, const Vec& v) { v.store(p + i, static_cast<int>(c)); }

// ---- the shared pass ------------------------------------------------------------------------

struct Operand {
  const void* data = nullptr;
  at::ScalarType dtype = at::kFloat;
  explicit operator bool() const { return data != nullptr; }
};

inline Operand operand(const at::Tensor& t) { return {t.data_ptr(), t.scalar_type()}; }
inline Operand operand(const std::optional<at::Tensor>& t) { return t.has_value() ? operand(*t) : Operand{}; }

struct Pass {
  Operand model_output, sample, aux, mask, image_latents, noise;  // aux: step_noise or prev_x0
  void* out = nullptr;
  at::ScalarType out_dtype = at::kFloat;
  void* x0_out = nullptr;  // DPM's data prediction (model_output dtype)
  at::ScalarType x0_dtype = at::kFloat;
  bool cfg = false;
  float guidance = 0.f;
  float init_image = 1.f, init_noise = 0.f;
  int64_t batch = 0, numel = 0, per_item = 0, hw = 0;
  int64_t mask_bstride = 0, image_bstride = 0, noise_bstride = 0;
};

// The fp32 tile pointers the update sees; aux is null when the op has no such operand.
struct Tile {
  const float* aux;
  float* x0;  // DPM: where the data prediction goes (null otherwise)
};

// Runs `update(e, s, tile, i, count) -> prev` over every element, then the blend, then the store.
template <class Update>
void run_pass(const Pass& p, const Update& update) {
  if (p.numel == 0) return;
  const int64_t chunks = (p.per_item + kTask - 1) / kTask;
  const Vec g(p.guidance), one(1.f), ii(p.init_image), in(p.init_noise);
  at::parallel_for(0, p.batch * chunks, kGrainTasks, [&](int64_t t_begin, int64_t t_end) {
    alignas(64) float b_uncond[kTile], b_text[kTile], b_sample[kTile], b_aux[kTile], b_mask[kTile],
        b_image[kTile], b_noise[kTile], b_out[kTile], b_x0[kTile];
    for (int64_t task = t_begin; task < t_end; ++task) {
      const int64_t b = task / chunks;
      const int64_t end = std::min(p.per_item, (task % chunks + 1) * kTask);
      for (int64_t pos = (task % chunks) * kTask; pos < end; pos += kTile) {
        const int64_t n = std::min(kTile, end - pos);
        const int64_t off = b * p.per_item + pos;
        const float* u = read_f32(p.model_output.data, p.model_output.dtype, off, n, b_uncond);
        const float* t = p.cfg ? read_f32(p.model_output.data, p.model_output.dtype, p.numel + off, n, b_text) : nullptr;
        const float* s = read_f32(p.sample.data, p.sample.dtype, off, n, b_sample);
        const float* aux = p.aux ? read_f32(p.aux.data, p.aux.dtype, off, n, b_aux) : nullptr;
        const float* m = nullptr;
        const float* il = nullptr;
        const float* nz = nullptr;
        if (p.mask) {
          // mask element of latent offset `pos` inside item b: b * mask_bstride + pos % hw, in runs
          const int64_t mbase = b * p.mask_bstride;
          if (pos % p.hw + n <= p.hw) {
            m = read_f32(p.mask.data, p.mask.dtype, mbase + pos % p.hw, n, b_mask);
          } else {
            for (int64_t j = 0; j < n;) {
              const int64_t pix = (pos + j) % p.hw;
              const int64_t run = std::min(n - j, p.hw - pix);
              const float* src = read_f32(p.mask.data, p.mask.dtype, mbase + pix, run, b_mask + j);
              if (src != b_mask + j) std::copy(src, src + run, b_mask + j);
              j += run;
            }
            m = b_mask;
          }
          il = read_f32(p.image_latents.data, p.image_latents.dtype, b * p.image_bstride + pos, n, b_image);
          if (p.noise) nz = read_f32(p.noise.data, p.noise.dtype, b * p.noise_bstride + pos, n, b_noise);
        }
        float* dst = p.out_dtype == at::kFloat ? static_cast<float*>(p.out) + off : b_out;
        float* x0dst = nullptr;
        if (p.x0_out) x0dst = p.x0_dtype == at::kFloat ? static_cast<float*>(p.x0_out) + off : b_x0;
        const Tile tile{aux, x0dst};
        for (int64_t i = 0; i < n; i += Vec::size()) {
          const int64_t c = std::min<int64_t>(Vec::size(), n - i);
          // guided_fp32: uncond + g * (text - uncond)
          Vec e = ld(u, i, c);
          if (t) e = e + g * (ld(t, i, c) - e);
          Vec prev = update(e, ld(s, i, c), tile, i, c);
          if (m) {  // blend_fp32: (1 - mask) * init + mask * prev, init = ii * image + in * noise
            const Vec mv = ld(m, i, c);
            Vec init = ld(il, i, c);
            if (nz) init = ii * init + in * ld(nz, i, c);
            prev = (one - mv) * init + mv * prev;
          }
          st(dst, i, c, prev);
        }
        if (dst == b_out) write_f32(p.out, p.out_dtype, off, n, b_out);
        if (x0dst == b_x0) write_f32(p.x0_out, p.x0_dtype, off, n, b_x0);
      }
    }
  });
}

// ---- argument checks ------------------------------------------------------------------------

Pass make_pass(const char* op, const at::Tensor& model_output, const at::Tensor& sample,
               std::optional<double> guidance_scale, const std::optional<at::Tensor>& mask,
               const std::optional<at::Tensor>& image_latents, const std::optional<at::Tensor>& noise,
               double init_image, double init_noise, const at::Tensor& out) {
  TORCH_CHECK(sample.device().is_cpu(), op, ": the CPU kernel got sample on ", sample.device());
  const at::Device dev = sample.device();
  check_float_input(sample, op, "sample", dev);
  check_float_input(model_output, op, "model_output", dev);
  TORCH_CHECK(sample.dim() >= 1 && sample.size(0) > 0, op, ": sample must have a non-empty batch dimension, got ",
              shape_str(sample));
  const int64_t batch = sample.size(0);
  const bool cfg = guidance_scale.has_value();
  auto want = sample.sizes().vec();
  want[0] = cfg ? 2 * batch : batch;
  TORCH_CHECK(model_output.sizes() == at::IntArrayRef(want), op, ": model_output shape ", shape_str(model_output),
              " does not match sample shape ", shape_str(sample), cfg ? " with" : " without",
              " classifier-free guidance");
  TORCH_CHECK(out.device() == dev && out.scalar_type() == sample.scalar_type() && out.sizes() == sample.sizes() &&
                  out.is_contiguous(),
              op, ": out must be a contiguous ", sample.scalar_type(), " tensor of shape ", shape_str(sample), " on ",
              dev, ", got ", out.scalar_type(), " ", shape_str(out), " on ", out.device());
  Pass p;
  p.model_output = operand(model_output);
  p.sample = operand(sample);
  p.out = out.data_ptr();
  p.out_dtype = out.scalar_type();
  p.cfg = cfg;
  p.guidance = cfg ? static_cast<float>(*guidance_scale) : 0.f;
  p.batch = batch;
  p.numel = sample.numel();
  p.per_item = p.numel / batch;
  const int64_t channels = sample.dim() >= 2 ? sample.size(1) : 1;
  p.hw = channels ? p.per_item / channels : 0;
  if (mask.has_value()) {
    TORCH_CHECK(image_latents.has_value(), op, ": blend needs image_latents together with mask");
    check_float_input(*mask, op, "mask", dev);
    const int64_t bm = mask->dim() ? mask->size(0) : 0;
    TORCH_CHECK((bm == 1 || bm == batch || bm == 2 * batch) && mask->numel() == bm * p.hw, op, ": mask shape ",
                shape_str(*mask), " must be (1, B or 2B) x (1, *spatial) for sample ", shape_str(sample));
    p.mask = operand(*mask);
    p.mask_bstride = bm > 1 ? p.hw : 0;
    for (const auto* tp : {&image_latents, &noise}) {
      if (!tp->has_value()) continue;
      const at::Tensor& t = **tp;
      const char* name = tp == &image_latents ? "image_latents" : "noise";
      check_float_input(t, op, name, dev);
      bool ok = t.dim() == sample.dim() && (t.size(0) == 1 || t.size(0) == batch);
      for (int64_t d = 1; ok && d < t.dim(); ++d) ok = t.size(d) == sample.size(d);
      TORCH_CHECK(ok, op, ": ", name, " shape ", shape_str(t), " must be (1 or ", batch, ", *", shape_str(sample),
                  "[1:])");
    }
    p.image_latents = operand(*image_latents);
    p.image_bstride = image_latents->size(0) > 1 ? p.per_item : 0;
    if (noise.has_value()) {
      p.noise = operand(*noise);
      p.noise_bstride = noise->size(0) > 1 ? p.per_item : 0;
    }
    p.init_image = static_cast<float>(init_image);
    p.init_noise = static_cast<float>(init_noise);
  }
  return p;
}

void set_aux(Pass& p, const char* op, const char* name, const std::optional<at::Tensor>& t, const at::Tensor& sample) {
  if (!t.has_value()) return;
  check_float_input(*t, op, name, sample.device());
  TORCH_CHECK(t->sizes() == sample.sizes(), op, ": ", name, " shape ", shape_str(*t), " must equal sample shape ",
              shape_str(sample));
  p.aux = operand(*t);
}

inline Vec clamp_opt(const Vec& x, const std::optional<double>& clip) {
  if (!clip.has_value()) return x;
  const float c = static_cast<float>(*clip);
  return at::vec::clamp(x, Vec(-c), Vec(c));
}

// ---- the ops --------------------------------------------------------------------------------

void ddim_step_cpu(const at::Tensor& model_output, const at::Tensor& sample, std::optional<double> guidance_scale,
                   double x0_sample, double x0_model, double eps_sample, double eps_model, double prev_x0,
                   double prev_eps, std::optional<double> clip_range, const std::optional<at::Tensor>& mask,
                   const std::optional<at::Tensor>& image_latents, const std::optional<at::Tensor>& noise,
                   double init_image, double init_noise, const at::Tensor& out) {
  const Pass p = make_pass("ddim_step", model_output, sample, guidance_scale, mask, image_latents, noise, init_image,
                           init_noise, out);
  const Vec xs(static_cast<float>(x0_sample)), xm(static_cast<float>(x0_model));
  const Vec es(static_cast<float>(eps_sample)), em(static_cast<float>(eps_model));
  const Vec px(static_cast<float>(prev_x0)), pe(static_cast<float>(prev_eps));
  run_pass(p, [&](const Vec& e, const Vec& s, const Tile&, int64_t, int64_t) {
    const Vec x0 = clamp_opt(xs * s + xm * e, clip_range);
    const Vec eps = es * s + em * e;
    return px * x0 + pe * eps;
  });
}

void euler_step_cpu(const at::Tensor& model_output, const at::Tensor& sample, std::optional<double> guidance_scale,
                    double x0_sample, double x0_model, double sigma_hat, double dt,
                    const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& image_latents,
                    const std::optional<at::Tensor>& noise, double init_image, double init_noise,
                    const at::Tensor& out) {
  const Pass p = make_pass("euler_step", model_output, sample, guidance_scale, mask, image_latents, noise,
                           init_image, init_noise, out);
  const Vec xs(static_cast<float>(x0_sample)), xm(static_cast<float>(x0_model));
  const Vec sh(static_cast<float>(sigma_hat)), d(static_cast<float>(dt));
  run_pass(p, [&](const Vec& e, const Vec& s, const Tile&, int64_t, int64_t) {
    const Vec x0 = xs * s + xm * e;
    const Vec derivative = (s - x0) / sh;
    return s + derivative * d;
  });
}

void dpm_solver_step_cpu(const at::Tensor& model_output, const at::Tensor& sample,
                         std::optional<double> guidance_scale, double x0_sample, double x0_model, double coef_sample,
                         double coef_x0, double coef_diff, const std::optional<at::Tensor>& prev_x0,
                         const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& image_latents,
                         const std::optional<at::Tensor>& noise, double init_image, double init_noise,
                         const at::Tensor& out, const at::Tensor& x0_out) {
  const char* op = "dpm_solver_step";
  Pass p = make_pass(op, model_output, sample, guidance_scale, mask, image_latents, noise, init_image, init_noise,
                     out);
  TORCH_CHECK(x0_out.device() == sample.device() && x0_out.scalar_type() == model_output.scalar_type() &&
                  x0_out.sizes() == sample.sizes() && x0_out.is_contiguous(),
              op, ": x0_out must be a contiguous ", model_output.scalar_type(), " tensor of shape ",
              shape_str(sample), ", got ", x0_out.scalar_type(), " ", shape_str(x0_out), " on ", x0_out.device());
  set_aux(p, op, "prev_x0", prev_x0, sample);
  p.x0_out = x0_out.data_ptr();
  p.x0_dtype = x0_out.scalar_type();
  const at::ScalarType x0_dtype = p.x0_dtype;
  const Vec xs(static_cast<float>(x0_sample)), xm(static_cast<float>(x0_model));
  const Vec cs(static_cast<float>(coef_sample)), cx(static_cast<float>(coef_x0)), cd(static_cast<float>(coef_diff));
  run_pass(p, [&](const Vec& e, const Vec& s, const Tile& tile, int64_t i, int64_t c) {
    // m0 = the stored (model_output dtype) data prediction, read back as the reference does
    const Vec m0 = round_through(xs * s + xm * e, x0_dtype);
    st(tile.x0, i, c, m0);
    Vec prev = cs * s + cx * m0;
    if (tile.aux) prev = prev + cd * (m0 - ld(tile.aux, i, c));
    return prev;
  });
}

void lcm_step_cpu(const at::Tensor& model_output, const at::Tensor& sample, std::optional<double> guidance_scale,
                  double x0_sample, double x0_model, double c_skip, double c_out, double prev_denoised,
                  double prev_noise, const std::optional<at::Tensor>& step_noise, std::optional<double> clip_range,
                  const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& image_latents,
                  const std::optional<at::Tensor>& noise, double init_image, double init_noise,
                  const at::Tensor& out) {
  const char* op = "lcm_step";
  Pass p = make_pass(op, model_output, sample, guidance_scale, mask, image_latents, noise, init_image, init_noise,
                     out);
  set_aux(p, op, "step_noise", step_noise, sample);
  const Vec xs(static_cast<float>(x0_sample)), xm(static_cast<float>(x0_model));
  const Vec cs(static_cast<float>(c_skip)), co(static_cast<float>(c_out));
  const Vec pd(static_cast<float>(prev_denoised)), pn(static_cast<float>(prev_noise));
  run_pass(p, [&](const Vec& e, const Vec& s, const Tile& tile, int64_t i, int64_t c) {
    const Vec x0 = clamp_opt(xs * s + xm * e, clip_range);
    Vec prev = co * x0 + cs * s;
    if (tile.aux) prev = pd * prev + pn * ld(tile.aux, i, c);
    return prev;
  });
}

void tcd_step_cpu(const at::Tensor& model_output, const at::Tensor& sample, std::optional<double> guidance_scale,
                  double x0_sample, double x0_model, double eps_sample, double eps_model, double noised_x0,
                  double noised_eps, double prev_noised, double prev_noise,
                  const std::optional<at::Tensor>& step_noise, const std::optional<at::Tensor>& mask,
                  const std::optional<at::Tensor>& image_latents, const std::optional<at::Tensor>& noise,
                  double init_image, double init_noise, const at::Tensor& out) {
  const char* op = "tcd_step";
  Pass p = make_pass(op, model_output, sample, guidance_scale, mask, image_latents, noise, init_image, init_noise,
                     out);
  set_aux(p, op, "step_noise", step_noise, sample);
  const Vec xs(static_cast<float>(x0_sample)), xm(static_cast<float>(x0_model));
  const Vec es(static_cast<float>(eps_sample)), em(static_cast<float>(eps_model));
  const Vec nx(static_cast<float>(noised_x0)), ne(static_cast<float>(noised_eps));
  const Vec pd(static_cast<float>(prev_noised)), pn(static_cast<float>(prev_noise));
  run_pass(p, [&](const Vec& e, const Vec& s, const Tile& tile, int64_t i, int64_t c) {
    const Vec x0 = xs * s + xm * e;
    const Vec eps = es * s + em * e;
    Vec prev = nx * x0 + ne * eps;
    if (tile.aux) prev = pd * prev + pn * ld(tile.aux, i, c);
    return prev;
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(cg4ctr, CPU, m) {
  m.impl("ddim_step", &ddim_step_cpu);
  m.impl("euler_step", &euler_step_cpu);
  m.impl("dpm_solver_step", &dpm_solver_step_cpu);
  m.impl("lcm_step", &lcm_step_cpu);
  m.impl("tcd_step", &tcd_step_cpu);
}

}  // namespace cg4ctr
