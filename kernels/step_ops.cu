// CUDA implementations of the fused denoising step ops (namespace cg4ctr): CFG combine + scheduler
// update + inpainting blend in one elementwise pass, fp32 math, stored in the input dtype.
//
// The schemas live in the CPU source (TORCH_LIBRARY(cg4ctr, m)); this file only registers the CUDA
// kernels for them. The math is that of cg4ctr_fast/kernels/reference.py (the *_ref functions) and the
// layout rules those of cg4ctr_fast/kernels/_layout.py:
//   sample (B, C, *spatial); model_output (2B, ...) = cat([uncond, text]) with guidance, else (B, ...);
//   mask (Bm, 1, *spatial), Bm in {1, B, 2B} (a 2B mask: its first B items are used);
//   image_latents / noise (1 or B, C, *spatial); noise absent = last step, the blend target is
//   image_latents itself, else init_image * image_latents + init_noise * noise.
// Element i of the latents is batch i / (C*HW), pixel (i % (C*HW)) % HW.
// The math is written in the references' order; built with --fmad=false (CMakeLists.txt) nothing is
// contracted into an FMA, so each product and sum rounds as torch's separate ops do.
//
// Compile check without a GPU (nothing is linked or run), from the repository root:
//   TORCH_INC=$(.venv/bin/python -c "import torch.utils.cpp_extension as c; print(c.include_paths()[0])")
//   ABI=$(.venv/bin/python -c "import torch; print(int(torch.compiled_with_cxx11_abi()))")
//   /usr/local/cuda-13.0/bin/nvcc -c -std=c++20 -O3 --fmad=false -arch=sm_90 -I$TORCH_INC -I$TORCH_INC/torch/csrc/api/include \
//     -D_GLIBCXX_USE_CXX11_ABI=$ABI -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE -Xcompiler -fPIC \
//     kernels/step_ops.cu -o /tmp/step_ops.o
// (-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE only because a CPU-only torch ships without the generated
// c10/cuda/impl/cuda_cmake_macros.h; a CUDA build of torch has it and needs no such flag. The file also
// compiles with the -D__CUDA_NO_HALF_OPERATORS__ family of flags torch's extension builder adds.)
// -std=c++20 as CMakeLists.txt builds CUDA; -std=c++17 compiles too. Under C++20 nvcc warns (#20013) that
// torch's headeronly/util/BFloat16.h calls the host-only std::bit_cast from a __host__ __device__
// function; these kernels never call it on the device (CMakeLists.txt adds --expt-relaxed-constexpr and the
// -D__CUDA_NO_HALF_OPERATORS__ family, with which both files compile without a warning).

// ATen/cuda/CUDAContext.h is not included: it pulls in the cuBLAS/cuSPARSE/cuSOLVER headers, which a minimal
// CUDA toolkit lacks. c10/cuda/CUDAStream.h declares getCurrentCUDAStream (reachable as at::cuda:: too).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Optional.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

namespace cg4ctr_cuda {
namespace {

// ------------------------------------------------------------------------------------------------
// Element access. Every operand is read through a Src (pointer + dtype tag). A kernel instantiated for
// one storage type T (F32, F16, BF16) reads and writes all operands as T (every tensor of the call has
// that dtype: the usual case, no per-element branch); the AnyDtype instantiation branches on each
// operand's tag, so a call with mixed dtypes (e.g. an fp32 mask with fp16 latents) runs without
// converting copies. 16-bit values are converted with the CUDA intrinsics (round to nearest even, as
// Tensor.copy_ does), not c10::Half / c10::BFloat16: c10's bfloat16 rounding is a host-only constexpr
// (std::bit_cast) under C++20.

enum Kind : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

struct F32 {};
struct F16 {};
struct BF16 {};
struct AnyDtype {};

struct Src {
  const void* ptr;
  int kind;
};

struct Dst {
  void* ptr;
  int kind;
};

template <int K, typename I>
__device__ __forceinline__ float ld_kind(const void* p, I i) {
  if constexpr (K == kF16) {
    return __half2float(__ushort_as_half(static_cast<const unsigned short*>(p)[i]));
  } else if constexpr (K == kBF16) {
    return __bfloat162float(__ushort_as_bfloat16(static_cast<const unsigned short*>(p)[i]));
  } else {
    return static_cast<const float*>(p)[i];
  }
}

// Stores x rounded to the dtype; returns the stored value as fp32.
template <int K, typename I>
__device__ __forceinline__ float st_kind(void* p, I i, float x) {
  if constexpr (K == kF16) {
    const __half h = __float2half_rn(x);
    static_cast<unsigned short*>(p)[i] = __half_as_ushort(h);
    return __half2float(h);
  } else if constexpr (K == kBF16) {
    const __nv_bfloat16 b = __float2bfloat16_rn(x);
    static_cast<unsigned short*>(p)[i] = __bfloat16_as_ushort(b);
    return __bfloat162float(b);
  } else {
    static_cast<float*>(p)[i] = x;
    return x;
  }
}

template <typename T>
constexpr int kind_v = std::is_same_v<T, F16> ? kF16 : (std::is_same_v<T, BF16> ? kBF16 : kF32);

template <typename T, typename I>
__device__ __forceinline__ float ld(const Src& s, I i) {
  if constexpr (std::is_same_v<T, AnyDtype>) {
    switch (s.kind) {
      case kF16:
        return ld_kind<kF16>(s.ptr, i);
      case kBF16:
        return ld_kind<kBF16>(s.ptr, i);
      default:
        return ld_kind<kF32>(s.ptr, i);
    }
  } else {
    return ld_kind<kind_v<T>>(s.ptr, i);
  }
}

// Store x rounded to nearest even in the operand's dtype; returns the stored value read back as fp32
// (DPM-Solver++ continues with the rounded data prediction, as diffusers does).
template <typename T, typename I>
__device__ __forceinline__ float st(const Dst& d, I i, float x) {
  if constexpr (std::is_same_v<T, AnyDtype>) {
    switch (d.kind) {
      case kF16:
        return st_kind<kF16>(d.ptr, i, x);
      case kBF16:
        return st_kind<kBF16>(d.ptr, i, x);
      default:
        return st_kind<kF32>(d.ptr, i, x);
    }
  } else {
    return st_kind<kind_v<T>>(d.ptr, i, x);
  }
}

// torch.clamp semantics: NaN stays NaN (fminf/fmaxf would drop it).
__device__ __forceinline__ float clamp_nan(float x, float r) {
  return x < -r ? -r : (x > r ? r : x);
}

// What every step shares: operands of the CFG read and of the blend, and the index constants.
template <typename I>
struct Common {
  Src mo, sample, mask, image, noise;
  Dst out;
  I numel;  // elements of sample (= of one half of a CFG model_output)
  I per_item;  // C * HW
  I hw;  // pixels per channel
  I mask_bs, image_bs, noise_bs;  // batch strides in elements; 0 for batch-1 operands
  float guidance, init_image, init_noise;
  bool cfg, blend, has_noise;
};

template <typename T, typename I>
__device__ __forceinline__ float guided(const Common<I>& c, I i) {
  if (c.cfg) {
    const float u = ld<T>(c.mo, i);
    const float t = ld<T>(c.mo, c.numel + i);
    return u + c.guidance * (t - u);
  }
  return ld<T>(c.mo, i);
}

template <typename T, typename I>
__device__ __forceinline__ float blend(const Common<I>& c, float prev, I i) {
  if (!c.blend) return prev;
  const I b = i / c.per_item;
  const I within = i - b * c.per_item;
  const I pix = within % c.hw;
  const float m = ld<T>(c.mask, b * c.mask_bs + pix);
  float init = ld<T>(c.image, b * c.image_bs + within);
  if (c.has_noise) init = c.init_image * init + c.init_noise * ld<T>(c.noise, b * c.noise_bs + within);
  return (1.0f - m) * init + m * prev;
}

// ------------------------------------------------------------------------------------------------
// Per-family updates: prev from the guided model output e and the sample s (reference.py's formulas).

struct DdimOp {
  float x0_sample, x0_model, eps_sample, eps_model, prev_x0, prev_eps, clip_range;
  bool clip;
  template <typename T, typename I>
  __device__ __forceinline__ float operator()(float e, float s, I) const {
    float x0 = x0_sample * s + x0_model * e;
    if (clip) x0 = clamp_nan(x0, clip_range);
    const float eps = eps_sample * s + eps_model * e;
    return prev_x0 * x0 + prev_eps * eps;
  }
};

struct EulerOp {
  float x0_sample, x0_model, sigma_hat, dt;
  template <typename T, typename I>
  __device__ __forceinline__ float operator()(float e, float s, I) const {
    const float x0 = x0_sample * s + x0_model * e;
    const float derivative = (s - x0) / sigma_hat;
    return s + derivative * dt;
  }
};

struct DpmOp {
  float x0_sample, x0_model, coef_sample, coef_x0, coef_diff;
  Dst x0_out;
  Src prev_x0;
  bool has_prev;
  template <typename T, typename I>
  __device__ __forceinline__ float operator()(float e, float s, I i) const {
    const float m0 = st<T>(x0_out, i, x0_sample * s + x0_model * e);
    float prev = coef_sample * s + coef_x0 * m0;
    if (has_prev) prev = prev + coef_diff * (m0 - ld<T>(prev_x0, i));
    return prev;
  }
};

struct LcmOp {
  float x0_sample, x0_model, c_skip, c_out, prev_denoised, prev_noise, clip_range;
  Src step_noise;
  bool clip, has_step_noise;
  template <typename T, typename I>
  __device__ __forceinline__ float operator()(float e, float s, I i) const {
    float x0 = x0_sample * s + x0_model * e;
    if (clip) x0 = clamp_nan(x0, clip_range);
    float prev = c_out * x0 + c_skip * s;
    if (has_step_noise) prev = prev_denoised * prev + prev_noise * ld<T>(step_noise, i);
    return prev;
  }
};

struct TcdOp {
  float x0_sample, x0_model, eps_sample, eps_model, noised_x0, noised_eps, prev_noised, prev_noise;
  Src step_noise;
  bool has_step_noise;
  template <typename T, typename I>
  __device__ __forceinline__ float operator()(float e, float s, I i) const {
    const float x0 = x0_sample * s + x0_model * e;
    const float eps = eps_sample * s + eps_model * e;
    float prev = noised_x0 * x0 + noised_eps * eps;
    if (has_step_noise) prev = prev_noised * prev + prev_noise * ld<T>(step_noise, i);
    return prev;
  }
};

// One pass: grid-stride loop over the B latents' elements.
template <typename T, typename I, typename Op>
__global__ void step_kernel(const Common<I> c, const Op op) {
  const I stride = static_cast<I>(blockDim.x) * static_cast<I>(gridDim.x);
  for (I i = static_cast<I>(blockIdx.x) * static_cast<I>(blockDim.x) + static_cast<I>(threadIdx.x); i < c.numel;
       i += stride) {
    const float e = guided<T>(c, i);
    const float s = ld<T>(c.sample, i);
    const float prev = op.template operator()<T, I>(e, s, i);
    st<T>(c.out, i, blend<T>(c, prev, i));
  }
}

// ------------------------------------------------------------------------------------------------
// Host side: checks (the messages of _layout.prepare / check_out / check_step_noise), then one launch.

constexpr int kThreads = 256;

bool is_float(const at::Tensor& t) {
  const auto d = t.scalar_type();
  return d == at::kFloat || d == at::kHalf || d == at::kBFloat16;
}

int kind_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf:
      return kF16;
    case at::kBFloat16:
      return kBF16;
    default:
      return kF32;
  }
}

std::string shape_str(const at::Tensor& t) {
  std::string s = "(";
  for (int64_t k = 0; k < t.dim(); ++k) s += (k ? ", " : "") + std::to_string(t.size(k));
  return s + (t.dim() == 1 ? ",)" : ")");
}

void check_dtype(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(is_float(t), "cg4ctr::", op, ": ", name, " must be float32, float16 or bfloat16, got ",
              t.scalar_type());
}

void check_cuda(const char* op, const char* name, const at::Tensor& t, const at::Tensor& sample) {
  TORCH_CHECK(t.is_cuda(), "cg4ctr::", op, ": ", name, " is on ", t.device(),
              "; the CUDA kernel needs every tensor on the CUDA device of sample (", sample.device(), ")");
  TORCH_CHECK(t.device() == sample.device(), "cg4ctr::", op, ": ", name, " is on ", t.device(), ", sample on ",
              sample.device());
}

// Validated, contiguous operands of one call (the C++ counterpart of _layout.Layout).
struct Prepared {
  at::Tensor mo, sample, mask, image, noise;
  int64_t batch = 0, numel = 0, per_item = 0, hw = 0, mask_bs = 0, image_bs = 0, noise_bs = 0;
  bool cfg = false, blend = false, has_noise = false;
  std::vector<at::ScalarType> dtypes;  // of every tensor the kernel touches (outputs included)
};

Prepared prepare(const char* op, const at::Tensor& model_output, const at::Tensor& sample,
                 const c10::optional<double>& guidance_scale, const c10::optional<at::Tensor>& mask,
                 const c10::optional<at::Tensor>& image_latents, const c10::optional<at::Tensor>& noise) {
  Prepared p;
  TORCH_CHECK(sample.dim() >= 1 && sample.size(0) > 0, "cg4ctr::", op,
              ": sample must have a non-empty batch dimension, got shape ", shape_str(sample));
  check_dtype(op, "sample", sample);
  check_dtype(op, "model_output", model_output);
  TORCH_CHECK(sample.is_cuda(), "cg4ctr::", op, ": sample is on ", sample.device(), ", not a CUDA device");
  check_cuda(op, "model_output", model_output, sample);
  p.cfg = guidance_scale.has_value();
  p.batch = sample.size(0);
  std::vector<int64_t> want = sample.sizes().vec();
  want[0] = p.cfg ? 2 * p.batch : p.batch;
  TORCH_CHECK(model_output.sizes().vec() == want, "cg4ctr::", op, ": model_output shape ", shape_str(model_output),
              " does not match sample shape ", shape_str(sample), p.cfg ? " with" : " without",
              " classifier-free guidance (expected ", at::IntArrayRef(want), ")");
  p.numel = sample.numel();
  p.per_item = p.numel / p.batch;
  const int64_t channels = sample.dim() >= 2 ? sample.size(1) : 1;
  p.hw = channels ? p.per_item / channels : 0;
  p.mo = model_output.contiguous();
  p.sample = sample.contiguous();
  p.dtypes = {sample.scalar_type(), model_output.scalar_type()};

  if (mask.has_value()) {
    TORCH_CHECK(image_latents.has_value(), "cg4ctr::", op, ": blend needs image_latents together with mask");
    const at::Tensor& m = *mask;
    check_dtype(op, "mask", m);
    check_cuda(op, "mask", m, sample);
    const int64_t bm = m.dim() ? m.size(0) : 0;
    TORCH_CHECK((bm == 1 || bm == p.batch || bm == 2 * p.batch) && m.numel() == bm * p.hw, "cg4ctr::", op,
                ": mask shape ", shape_str(m), " must be (1, B or 2B) x (1, *spatial) for sample ", shape_str(sample));
    p.mask = m.contiguous();
    p.mask_bs = bm > 1 ? p.hw : 0;
    p.dtypes.push_back(m.scalar_type());
    const std::pair<const char*, const c10::optional<at::Tensor>*> extra[] = {{"image_latents", &image_latents},
                                                                             {"noise", &noise}};
    for (const auto& [name, opt] : extra) {
      if (!opt->has_value()) continue;
      const at::Tensor& t = **opt;
      check_dtype(op, name, t);
      check_cuda(op, name, t, sample);
      bool ok = t.dim() == sample.dim() && (t.size(0) == 1 || t.size(0) == p.batch);
      for (int64_t k = 1; ok && k < t.dim(); ++k) ok = t.size(k) == sample.size(k);
      TORCH_CHECK(ok, "cg4ctr::", op, ": ", name, " shape ", shape_str(t), " must be (1 or ", p.batch,
                  ", *spatial of sample ", shape_str(sample), ")");
      p.dtypes.push_back(t.scalar_type());
    }
    p.image = image_latents->contiguous();
    p.image_bs = p.image.size(0) > 1 ? p.per_item : 0;
    if (noise.has_value()) {
      p.noise = noise->contiguous();
      p.noise_bs = p.noise.size(0) > 1 ? p.per_item : 0;
      p.has_noise = true;
    }
    p.blend = true;
  }
  return p;
}

void check_out(const char* op, const char* name, const at::Tensor& out, const at::Tensor& like,
               at::ScalarType dtype) {
  TORCH_CHECK(out.sizes() == like.sizes() && out.scalar_type() == dtype && out.device() == like.device(), "cg4ctr::",
              op, ": ", name, " must be a ", dtype, " tensor of shape ", shape_str(like), " on ", like.device(),
              ", got ", out.scalar_type(), " ", shape_str(out), " on ", out.device());
  TORCH_CHECK(out.is_contiguous(), "cg4ctr::", op, ": ", name, " must be contiguous");
}

// step_noise (LCM/TCD) and prev_x0 (DPM-Solver++): a float tensor shaped like sample on its device.
at::Tensor check_like_sample(const char* op, const char* name, const at::Tensor& t, Prepared& p) {
  check_dtype(op, name, t);
  TORCH_CHECK(t.sizes() == p.sample.sizes() && t.device() == p.sample.device(), "cg4ctr::", op, ": ", name,
              " must have the shape ", shape_str(p.sample), " and device ", p.sample.device(), " of sample, got ",
              shape_str(t), " on ", t.device());
  p.dtypes.push_back(t.scalar_type());
  return t.contiguous();
}

Src src(const at::Tensor& t) {
  if (!t.defined()) return Src{nullptr, kF32};
  return Src{t.data_ptr(), kind_of(t)};
}

Dst dst(const at::Tensor& t) { return Dst{t.data_ptr(), kind_of(t)}; }

template <typename I>
Common<I> common(const Prepared& p, const at::Tensor& out, const c10::optional<double>& guidance_scale,
                 double init_image, double init_noise) {
  Common<I> c;
  c.mo = src(p.mo);
  c.sample = src(p.sample);
  c.mask = src(p.mask);
  c.image = src(p.image);
  c.noise = src(p.noise);
  c.out = dst(out);
  c.numel = static_cast<I>(p.numel);
  c.per_item = static_cast<I>(p.per_item);
  c.hw = static_cast<I>(p.hw);
  c.mask_bs = static_cast<I>(p.mask_bs);
  c.image_bs = static_cast<I>(p.image_bs);
  c.noise_bs = static_cast<I>(p.noise_bs);
  c.guidance = guidance_scale.has_value() ? static_cast<float>(*guidance_scale) : 1.0f;
  c.init_image = static_cast<float>(init_image);
  c.init_noise = static_cast<float>(init_noise);
  c.cfg = p.cfg;
  c.blend = p.blend;
  c.has_noise = p.has_noise;
  return c;
}

template <typename T, typename I, typename Op>
void launch_typed(const Prepared& p, const at::Tensor& out, const c10::optional<double>& g, double init_image,
                  double init_noise, const Op& op) {
  const Common<I> c = common<I>(p, out, g, init_image, init_noise);
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, p.sample.get_device()));
  const int64_t blocks_needed = (p.numel + kThreads - 1) / kThreads;
  // enough resident blocks to cover the SMs several times over; the grid-stride loop does the rest
  const int blocks = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(blocks_needed, int64_t(sms) * 16)));
  step_kernel<T, I, Op><<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(c, op);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Picks the storage-type instantiation (one dtype for all operands, else AnyDtype) and the index width
// (32-bit when every offset, including the CFG half numel + i, fits).
template <typename Op>
void launch(const Prepared& p, const at::Tensor& out, const c10::optional<double>& g, double init_image,
            double init_noise, const Op& op) {
  if (p.numel == 0) return;
  const c10::cuda::CUDAGuard guard(p.sample.device());
  at::ScalarType dtype = p.dtypes.front();
  bool uniform = true;
  for (const auto d : p.dtypes) uniform = uniform && d == dtype;
  const bool small = 2 * p.numel + kThreads * int64_t(1 << 16) < std::numeric_limits<int32_t>::max();
  auto go = [&](auto type_tag) {
    using T = decltype(type_tag);
    if (small)
      launch_typed<T, int32_t>(p, out, g, init_image, init_noise, op);
    else
      launch_typed<T, int64_t>(p, out, g, init_image, init_noise, op);
  };
  if (!uniform) return go(AnyDtype{});
  switch (dtype) {
    case at::kHalf:
      return go(F16{});
    case at::kBFloat16:
      return go(BF16{});
    default:
      return go(F32{});
  }
}

float f(double x) { return static_cast<float>(x); }

// ------------------------------------------------------------------------------------------------
// The ops (argument order = the schemas).

void ddim_step_cuda(const at::Tensor& model_output, const at::Tensor& sample, c10::optional<double> guidance_scale,
                    double x0_sample, double x0_model, double eps_sample, double eps_model, double prev_x0,
                    double prev_eps, c10::optional<double> clip_range, const c10::optional<at::Tensor>& mask,
                    const c10::optional<at::Tensor>& image_latents, const c10::optional<at::Tensor>& noise,
                    double init_image, double init_noise, const at::Tensor& out) {
  Prepared p = prepare("ddim_step", model_output, sample, guidance_scale, mask, image_latents, noise);
  check_out("ddim_step", "out", out, p.sample, p.sample.scalar_type());
  const DdimOp op{f(x0_sample), f(x0_model), f(eps_sample), f(eps_model), f(prev_x0), f(prev_eps),
                  clip_range.has_value() ? f(*clip_range) : 0.0f, clip_range.has_value()};
  launch(p, out, guidance_scale, init_image, init_noise, op);
}

void euler_step_cuda(const at::Tensor& model_output, const at::Tensor& sample, c10::optional<double> guidance_scale,
                     double x0_sample, double x0_model, double sigma_hat, double dt,
                     const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& image_latents,
                     const c10::optional<at::Tensor>& noise, double init_image, double init_noise,
                     const at::Tensor& out) {
  Prepared p = prepare("euler_step", model_output, sample, guidance_scale, mask, image_latents, noise);
  check_out("euler_step", "out", out, p.sample, p.sample.scalar_type());
  const EulerOp op{f(x0_sample), f(x0_model), f(sigma_hat), f(dt)};
  launch(p, out, guidance_scale, init_image, init_noise, op);
}

void dpm_solver_step_cuda(const at::Tensor& model_output, const at::Tensor& sample,
                          c10::optional<double> guidance_scale, double x0_sample, double x0_model, double coef_sample,
                          double coef_x0, double coef_diff, const c10::optional<at::Tensor>& prev_x0,
                          const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& image_latents,
                          const c10::optional<at::Tensor>& noise, double init_image, double init_noise,
                          const at::Tensor& out, const at::Tensor& x0_out) {
  Prepared p = prepare("dpm_solver_step", model_output, sample, guidance_scale, mask, image_latents, noise);
  check_out("dpm_solver_step", "out", out, p.sample, p.sample.scalar_type());
  check_out("dpm_solver_step", "x0_out", x0_out, p.sample, model_output.scalar_type());
  p.dtypes.push_back(x0_out.scalar_type());
  at::Tensor prev;
  if (prev_x0.has_value()) prev = check_like_sample("dpm_solver_step", "prev_x0", *prev_x0, p);
  const DpmOp op{f(x0_sample), f(x0_model), f(coef_sample), f(coef_x0), f(coef_diff), dst(x0_out), src(prev),
                 prev.defined()};
  launch(p, out, guidance_scale, init_image, init_noise, op);
}

void lcm_step_cuda(const at::Tensor& model_output, const at::Tensor& sample, c10::optional<double> guidance_scale,
                   double x0_sample, double x0_model, double c_skip, double c_out, double prev_denoised,
                   double prev_noise, const c10::optional<at::Tensor>& step_noise, c10::optional<double> clip_range,
                   const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& image_latents,
                   const c10::optional<at::Tensor>& noise, double init_image, double init_noise,
                   const at::Tensor& out) {
  Prepared p = prepare("lcm_step", model_output, sample, guidance_scale, mask, image_latents, noise);
  check_out("lcm_step", "out", out, p.sample, p.sample.scalar_type());
  at::Tensor z;
  if (step_noise.has_value()) z = check_like_sample("lcm_step", "step_noise", *step_noise, p);
  const LcmOp op{f(x0_sample), f(x0_model), f(c_skip), f(c_out), f(prev_denoised), f(prev_noise),
                 clip_range.has_value() ? f(*clip_range) : 0.0f, src(z), clip_range.has_value(), z.defined()};
  launch(p, out, guidance_scale, init_image, init_noise, op);
}

void tcd_step_cuda(const at::Tensor& model_output, const at::Tensor& sample, c10::optional<double> guidance_scale,
                   double x0_sample, double x0_model, double eps_sample, double eps_model, double noised_x0,
                   double noised_eps, double prev_noised, double prev_noise,
                   const c10::optional<at::Tensor>& step_noise, const c10::optional<at::Tensor>& mask,
                   const c10::optional<at::Tensor>& image_latents, const c10::optional<at::Tensor>& noise,
                   double init_image, double init_noise, const at::Tensor& out) {
  Prepared p = prepare("tcd_step", model_output, sample, guidance_scale, mask, image_latents, noise);
  check_out("tcd_step", "out", out, p.sample, p.sample.scalar_type());
  at::Tensor z;
  if (step_noise.has_value()) z = check_like_sample("tcd_step", "step_noise", *step_noise, p);
  const TcdOp op{f(x0_sample), f(x0_model), f(eps_sample), f(eps_model), f(noised_x0), f(noised_eps),
                 f(prev_noised), f(prev_noise), src(z), z.defined()};
  launch(p, out, guidance_scale, init_image, init_noise, op);
}

}  // namespace
}  // namespace cg4ctr_cuda

TORCH_LIBRARY_IMPL(cg4ctr, CUDA, m) {
  m.impl("ddim_step", &cg4ctr_cuda::ddim_step_cuda);
  m.impl("euler_step", &cg4ctr_cuda::euler_step_cuda);
  m.impl("dpm_solver_step", &cg4ctr_cuda::dpm_solver_step_cuda);
  m.impl("lcm_step", &cg4ctr_cuda::lcm_step_cuda);
  m.impl("tcd_step", &cg4ctr_cuda::tcd_step_cuda);
}
