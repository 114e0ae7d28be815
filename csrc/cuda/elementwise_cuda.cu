// CUDA kernels of the fused elementwise passes (the private ops of
// csrc/common/elementwise_ops.h; per-element maths in csrc/common/elementwise_math.h).
// Max-pool windows (kernel = stride) are disjoint, so each pooled element owns the
// full-resolution positions it scatters to: no atomics are needed.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "../common/elementwise_math.h"
#include "../common/elementwise_ops.h"

namespace dtp_ext {
namespace {

constexpr int kThreads = 256;
// Grids are capped (about a million threads, several waves of a large GPU's resident threads);
// every kernel's grid-stride loop covers the rest.
constexpr int64_t kMaxBlocks = 4096;

int64_t blocks_for(int64_t n) {
  return std::min<int64_t>(kMaxBlocks, std::max<int64_t>(1, (n + kThreads - 1) / kThreads));
}

template <Activation A, typename T>
__global__ void phi_unpool_difference_kernel(const T* a, const T* a_noise, T alpha,
                                             const int64_t* a_idx, const T* b, const int64_t* b_idx,
                                             T* out, int64_t n, int64_t pooled_plane,
                                             int64_t full_plane, T scale) {
  for (int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; j < n;
       j += int64_t(gridDim.x) * blockDim.x) {
    const T av = a_noise ? a[j] + alpha * a_noise[j] : a[j];
    const bool a_ok = index_in_plane(a_idx[j], full_plane);
    const bool b_ok = index_in_plane(b_idx[j], full_plane);
    CUDA_KERNEL_ASSERT(a_ok && b_ok && "dtp_ext: pool indices outside the pool's input plane");
    unpool_difference(out + (j / pooled_plane) * full_plane, int64_t(1), a_ok, a_idx[j], phi<A>(av),
                      b_ok, b_idx[j], &b[j], scale);
  }
}

template <Activation A, typename T>
__global__ void phi_difference_kernel(const T* a, const T* a_noise, T alpha, const T* b, T* out,
                                      int64_t n, T scale) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const T av = a_noise ? a[i] + alpha * a_noise[i] : a[i];
    out[i] = scale * (phi<A>(av) - b[i]);
  }
}

template <Activation A, typename T>
__global__ void activation_pool_backward_kernel(const T* s, const int64_t* idx, const T* d, T* out,
                                                int64_t n, int64_t pooled_plane,
                                                int64_t full_plane) {
  for (int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; j < n;
       j += int64_t(gridDim.x) * blockDim.x) {
    const T g = activation_backward<A>(d[j], s[j]);
    if (idx) {
      const bool ok = index_in_plane(idx[j], full_plane);
      CUDA_KERNEL_ASSERT(ok && "dtp_ext: pool indices outside the pool's input plane");
      if (ok) out[(j / pooled_plane) * full_plane + idx[j]] += g;
    } else {
      out[j] = g;
    }
  }
}

template <Activation A, typename T>
__global__ void noisy_difference_pooled_kernel(const T* z, const T* s, const int64_t* idx, T* out,
                                               int64_t n, int64_t height, int64_t width,
                                               int64_t k) {
  const int64_t out_h = height / k, out_w = width / k;
  for (int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; j < n;
       j += int64_t(gridDim.x) * blockDim.x) {
    const int64_t plane = j / (out_h * out_w), oh = (j / out_w) % out_h, ow = j % out_w;
    // The pool ranks phi(z), as the forward pass does (window_takes: ties where phi saturates).
    T best;
    const int64_t best_at =
        window_argmax<A>(z + plane * height * width, 1, oh * k * width + ow * k, width, k, best);
    unpool_difference(out + plane * height * width, int64_t(1), true, best_at, phi<A>(best),
                      s != nullptr, s ? idx[j] : 0, s ? &s[j] : nullptr, T(1));
  }
}

template <Activation A, typename T>
__global__ void noisy_difference_kernel(const T* z, const T* s, T* out, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    out[i] = phi_of_phi<A>(z[i]) - (s ? s[i] : T(0));
  }
}

at::Tensor noisy_difference_cuda(const at::Tensor& z_in, const at::Tensor& s_in,
                                 const at::Tensor& idx_in, Activation activation, int64_t pool,
                                 bool channels_last) {
  TORCH_CHECK(!channels_last, "dtp_ext: channels-last outputs are not implemented on CUDA");
  if (is_reduced_float(z_in)) {  // bfloat16/float16: in float32, rounded once at the end
    return noisy_difference_cuda(z_in.to(at::kFloat), to_opmath(s_in), idx_in, activation, pool,
                                 channels_last)
        .to(z_in.scalar_type());
  }
  const c10::cuda::CUDAGuard guard(z_in.device());
  auto z = z_in.contiguous();
  const auto s = s_in.defined() ? s_in.contiguous() : at::Tensor();
  auto out = pool > 0 ? at::zeros(z.sizes(), z.options()) : at::empty(z.sizes(), z.options());
  const int64_t n =
      pool > 0 ? z.size(0) * z.size(1) * (z.size(2) / pool) * (z.size(3) / pool) : z.numel();
  if (n == 0) return out;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "noisy_difference_cuda", [&] {
    DTP_DISPATCH_ACTIVATION(activation, [&] {
      if (pool > 0) {
        const auto idx = s.defined() ? idx_in.contiguous() : at::Tensor();
        noisy_difference_pooled_kernel<kAct, scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
            z.const_data_ptr<scalar_t>(), s.defined() ? s.const_data_ptr<scalar_t>() : nullptr,
            s.defined() ? idx.const_data_ptr<int64_t>() : nullptr, out.mutable_data_ptr<scalar_t>(),
            n, z.size(2), z.size(3), pool);
      } else {
        noisy_difference_kernel<kAct, scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
            z.const_data_ptr<scalar_t>(), s.defined() ? s.const_data_ptr<scalar_t>() : nullptr,
            out.mutable_data_ptr<scalar_t>(), n);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

template <typename T>
__global__ void sgd_ldrl_update_kernel(T* v, T* buf, const T* h, const T* e, int64_t n, T scale,
                                       T wd, T mu, T step) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    sgd_ldrl_step(v[i], buf[i], h[i], e ? &e[i] : nullptr, scale, wd, mu, step);
  }
}

void sgd_ldrl_update_cuda(at::Tensor& weight, at::Tensor& momentum_buffer,
                          const at::Tensor& reconstruction_pairing, const at::Tensor& noise_pairing,
                          double grad_scale, double weight_decay, double momentum, double lr) {
  if (is_reduced_float(weight)) {  // no float32 master: the step in float32, rounded once
    auto w = weight.to(at::kFloat);
    auto buf = momentum_buffer.to(at::kFloat);
    sgd_ldrl_update_cuda(w, buf, reconstruction_pairing, noise_pairing, grad_scale, weight_decay,
                         momentum, lr);
    weight.copy_(w);
    momentum_buffer.copy_(buf);
    return;
  }
  const c10::cuda::CUDAGuard guard(weight.device());
  // Pairings in a lower dtype (bfloat16 products, float32 masters) are read in the weight's.
  const auto h = reconstruction_pairing.to(weight.scalar_type()).contiguous();
  const auto e =
      noise_pairing.defined() ? noise_pairing.to(weight.scalar_type()).contiguous() : at::Tensor();
  const int64_t n = weight.numel();
  if (n == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "sgd_ldrl_update_cuda", [&] {
    sgd_ldrl_update_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
        weight.mutable_data_ptr<scalar_t>(), momentum_buffer.mutable_data_ptr<scalar_t>(),
        h.const_data_ptr<scalar_t>(), e.defined() ? e.const_data_ptr<scalar_t>() : nullptr, n,
        static_cast<scalar_t>(grad_scale), static_cast<scalar_t>(weight_decay),
        static_cast<scalar_t>(momentum), static_cast<scalar_t>(lr));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor phi_unpool_difference_cuda(const char* op, const at::Tensor& a_in,
                                      const at::Tensor& a_noise_in, double alpha,
                                      const at::Tensor& a_indices_in, const at::Tensor& b_in,
                                      const at::Tensor& b_indices_in, at::IntArrayRef out_sizes,
                                      Activation activation, double scale, bool channels_last) {
  TORCH_CHECK(!channels_last, "dtp_ext: channels-last outputs are not implemented on CUDA");
  if (is_reduced_float(a_in)) {  // bfloat16/float16: in float32, rounded once at the end
    return phi_unpool_difference_cuda(op, a_in.to(at::kFloat), to_opmath(a_noise_in), alpha,
                                      a_indices_in, to_opmath(b_in), b_indices_in, out_sizes,
                                      activation, scale, channels_last)
        .to(a_in.scalar_type());
  }
  const c10::cuda::CUDAGuard guard(a_in.device());
  const bool pooled = a_indices_in.defined();
  auto a = a_in.contiguous();
  auto b = b_in.contiguous();
  auto a_noise = a_noise_in.defined() ? a_noise_in.contiguous() : at::Tensor();
  auto out = pooled ? at::zeros(out_sizes, a.options()) : at::empty(out_sizes, a.options());
  at::Tensor a_idx = pooled ? a_indices_in.contiguous() : at::Tensor();
  at::Tensor b_idx = pooled ? b_indices_in.contiguous() : at::Tensor();
  const int64_t n = a.numel();
  if (n == 0) return out;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "phi_unpool_difference_cuda", [&] {
    const scalar_t* noise = a_noise.defined() ? a_noise.const_data_ptr<scalar_t>() : nullptr;
    DTP_DISPATCH_ACTIVATION(activation, [&] {
      if (pooled) {
        const int64_t planes = a.size(0) * a.size(1);
        phi_unpool_difference_kernel<kAct, scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
            a.const_data_ptr<scalar_t>(), noise, static_cast<scalar_t>(alpha),
            a_idx.const_data_ptr<int64_t>(), b.const_data_ptr<scalar_t>(),
            b_idx.const_data_ptr<int64_t>(), out.mutable_data_ptr<scalar_t>(), n, n / planes,
            out.numel() / planes, static_cast<scalar_t>(scale));
      } else {
        phi_difference_kernel<kAct, scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
            a.const_data_ptr<scalar_t>(), noise, static_cast<scalar_t>(alpha),
            b.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), n,
            static_cast<scalar_t>(scale));
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

at::Tensor activation_pool_backward_cuda(const char* op, const at::Tensor& output_in,
                                         const at::Tensor& indices_in, const at::Tensor& delta_in,
                                         at::IntArrayRef out_sizes, Activation activation) {
  if (is_reduced_float(output_in)) {  // bfloat16/float16: in float32, rounded once at the end
    return activation_pool_backward_cuda(op, output_in.to(at::kFloat), indices_in,
                                         to_opmath(delta_in), out_sizes, activation)
        .to(output_in.scalar_type());
  }
  const c10::cuda::CUDAGuard guard(output_in.device());
  auto output = output_in.contiguous();
  auto delta = delta_in.contiguous();
  const bool pooled = indices_in.defined();
  auto indices = pooled ? indices_in.contiguous() : at::Tensor();
  auto out =
      pooled ? at::zeros(out_sizes, output.options()) : at::empty(out_sizes, output.options());
  const int64_t n = output.numel();
  if (n == 0) return out;
  const int64_t planes = pooled ? output.size(0) * output.size(1) : 1;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(output.scalar_type(), "activation_pool_backward_cuda", [&] {
    DTP_DISPATCH_ACTIVATION(activation, [&] {
      activation_pool_backward_kernel<kAct, scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
          output.const_data_ptr<scalar_t>(), pooled ? indices.const_data_ptr<int64_t>() : nullptr,
          delta.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), n, n / planes,
          out.numel() / planes);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

}  // namespace
}  // namespace dtp_ext

// CUDA registers no channels-last rule (register_channels_last_rule): its convolutions run
// NCHW, which is why these kernels refuse a channels-last output.
TORCH_LIBRARY_IMPL(dtp_ext, CUDA, m) {
  dtp_ext::schema::register_elementwise_kernels<
      &dtp_ext::phi_unpool_difference_cuda, &dtp_ext::noisy_difference_cuda,
      &dtp_ext::sgd_ldrl_update_cuda, &dtp_ext::activation_pool_backward_cuda>(m);
}
