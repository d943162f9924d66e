// CUDA implementations of the paste-back composite ops (namespace cg4ctr), the math of
// cg4ctr_fast/imaging.py composite / composite_float after the per-pixel weights are known:
//
//   composite(original uint8 [..., H, W, 3], generated uint8 [..., H, W, 3], weights uint8 [..., H, W])
//     -> uint8 [..., H, W, 3]
//     out = (c * a + g * (255 - a) + 127) / 255           integer arithmetic, exact (255 is odd: no ties)
//   composite_float(original uint8 [..., H, W, 3], generated float32 [..., H, W, 3], weights uint8 [..., H, W])
//     -> float32 [..., H, W, 3]
//     out = (c / 255) * (a / 255) + g * (1 - a / 255)     float32, each operation rounded on its own
//
// a = weights[pixel] for the 3 channels of the pixel (imaging._paste_weights: alpha, or 255 without one,
// where the mask keeps the product; 0 on the background). The schemas live in the CPU source; this file only
// registers the CUDA kernels.
//
// Compile check without a GPU (nothing is linked or run), from the repository root:
//   TORCH_INC=$(.venv/bin/python -c "import torch.utils.cpp_extension as c; print(c.include_paths()[0])")
//   ABI=$(.venv/bin/python -c "import torch; print(int(torch.compiled_with_cxx11_abi()))")
//   /usr/local/cuda-13.0/bin/nvcc -c -std=c++20 -O3 --fmad=false -arch=sm_90 -I$TORCH_INC -I$TORCH_INC/torch/csrc/api/include \
//     -D_GLIBCXX_USE_CXX11_ABI=$ABI -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE -Xcompiler -fPIC \
//     kernels/composite.cu -o /tmp/composite.o
// (-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE only because a CPU-only torch ships without the generated
// c10/cuda/impl/cuda_cmake_macros.h; a CUDA build of torch has it and needs no such flag.)
// -std=c++20 as CMakeLists.txt builds CUDA; -std=c++17 compiles too. Under C++20 nvcc warns (#20013) that
// torch's headeronly/util/BFloat16.h calls the host-only std::bit_cast from a __host__ __device__
// function; these kernels never call it on the device (CMakeLists.txt adds --expt-relaxed-constexpr and the
// -D__CUDA_NO_HALF_OPERATORS__ family, with which both files compile without a warning).

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <string>

namespace cg4ctr_cuda {
namespace {

constexpr int kThreads = 256;

std::string shape_str(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t k = 0; k < t.dim(); ++k) s += (k ? ", " : "") + std::to_string(t.size(k));
  return s + "]";
}

// Exact uint8 blend: c*a + g*(255-a) <= 255*255, +127, then the division by the constant 255.
__global__ void composite_kernel(const uint8_t* __restrict__ orig, const uint8_t* __restrict__ gen,
                                 const uint8_t* __restrict__ weights, uint8_t* __restrict__ out, int64_t n,
                                 int64_t channels) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const uint32_t a = weights[i / channels];
    const uint32_t v = static_cast<uint32_t>(orig[i]) * a + static_cast<uint32_t>(gen[i]) * (255u - a) + 127u;
    out[i] = static_cast<uint8_t>(v / 255u);
  }
}

// The numpy expression (c * a + generated * (1 - a)) with c = C / 255, a = w / 255 in float32, each
// operation rounded separately (__f*_rn: no fused multiply-add), so the result matches numpy bit for bit
// and opaque pixels give exactly float32(C) / 255.
__global__ void composite_float_kernel(const uint8_t* __restrict__ orig, const float* __restrict__ gen,
                                       const uint8_t* __restrict__ weights, float* __restrict__ out, int64_t n,
                                       int64_t channels) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const float a = __fdiv_rn(static_cast<float>(weights[i / channels]), 255.0f);
    const float c = __fdiv_rn(static_cast<float>(orig[i]), 255.0f);
    out[i] = __fadd_rn(__fmul_rn(c, a), __fmul_rn(gen[i], __fsub_rn(1.0f, a)));
  }
}

void check_inputs(const char* op, const at::Tensor& original, const at::Tensor& generated, const at::Tensor& weights,
                  at::ScalarType generated_dtype) {
  TORCH_CHECK(original.scalar_type() == at::kByte, "cg4ctr::", op, ": original must be uint8, got ",
              original.scalar_type());
  TORCH_CHECK(generated.scalar_type() == generated_dtype, "cg4ctr::", op, ": generated must be ", generated_dtype,
              ", got ", generated.scalar_type());
  TORCH_CHECK(weights.scalar_type() == at::kByte, "cg4ctr::", op, ": weights must be uint8, got ",
              weights.scalar_type());
  TORCH_CHECK(original.dim() >= 3 && original.size(-1) == 3, "cg4ctr::", op, ": original must be [..., H, W, 3], got ",
              shape_str(original));
  TORCH_CHECK(generated.sizes() == original.sizes(), "cg4ctr::", op, ": generated is ", shape_str(generated),
              ", expected the shape of original ", shape_str(original));
  TORCH_CHECK(weights.sizes() == original.sizes().slice(0, original.dim() - 1), "cg4ctr::", op, ": weights is ",
              shape_str(weights), ", expected original's shape without the channel axis (original ",
              shape_str(original), ")");
  TORCH_CHECK(original.is_cuda(), "cg4ctr::", op, ": original is on ", original.device(), ", not a CUDA device");
  for (const at::Tensor* t : {&generated, &weights}) {
    TORCH_CHECK(t->device() == original.device(), "cg4ctr::", op, ": all tensors must be on ", original.device(),
                ", got one on ", t->device());
  }
}

int grid_for(int64_t n, const at::Tensor& like) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, like.get_device()));
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, int64_t(sms) * 16)));
}

at::Tensor composite_cuda(const at::Tensor& original, const at::Tensor& generated, const at::Tensor& weights) {
  check_inputs("composite", original, generated, weights, at::kByte);
  const c10::cuda::CUDAGuard guard(original.device());
  const at::Tensor o = original.contiguous(), g = generated.contiguous(), w = weights.contiguous();
  at::Tensor out = at::empty_like(o, o.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t n = o.numel();
  if (n == 0) return out;
  const int64_t channels = o.size(-1);
  composite_kernel<<<grid_for(n, o), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      o.data_ptr<uint8_t>(), g.data_ptr<uint8_t>(), w.data_ptr<uint8_t>(), out.data_ptr<uint8_t>(), n, channels);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor composite_float_cuda(const at::Tensor& original, const at::Tensor& generated, const at::Tensor& weights) {
  check_inputs("composite_float", original, generated, weights, at::kFloat);
  const c10::cuda::CUDAGuard guard(original.device());
  const at::Tensor o = original.contiguous(), g = generated.contiguous(), w = weights.contiguous();
  at::Tensor out = at::empty(o.sizes(), g.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t n = o.numel();
  if (n == 0) return out;
  const int64_t channels = o.size(-1);
  composite_float_kernel<<<grid_for(n, o), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      o.data_ptr<uint8_t>(), g.data_ptr<float>(), w.data_ptr<uint8_t>(), out.data_ptr<float>(), n, channels);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace cg4ctr_cuda

TORCH_LIBRARY_IMPL(cg4ctr, CUDA, m) {
  m.impl("composite", &cg4ctr_cuda::composite_cuda);
  m.impl("composite_float", &cg4ctr_cuda::composite_float_cuda);
}
