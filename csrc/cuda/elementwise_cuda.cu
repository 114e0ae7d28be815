// CUDA kernels of the fused elementwise passes (the private ops of
// csrc/common/elementwise_ops.h; per-element maths in csrc/common/elementwise_math.h).
// Max-pool windows (kernel = stride) are disjoint, so each pooled element owns its window (and,
// for the last window of a row or column, the positions past it that no window covers): its
// thread writes every one of those outputs, so the pooled passes need neither atomics nor a
// zero-filling pass. Index maths runs in 32 bits where the sizes allow.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <limits>

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

// Index arithmetic in 32 bits when every offset a kernel forms fits (all but huge tensors):
// 64-bit division, which the pooled kernels do per element, costs several times more.
template <typename F>
void with_index_type(int64_t largest_offset, const F& f) {
  // The grid-stride loop's last step may pass the end by a grid's worth of threads.
  if (largest_offset + kMaxBlocks * kThreads <= std::numeric_limits<int32_t>::max()) {
    f(int32_t{});
  } else {
    f(int64_t{});
  }
}

// A pooled pass's grid: planes of height x width pooled to out_h x out_w by k x k windows.
template <typename I>
struct PoolGrid {
  I height, width, out_h, out_w, k;
};

template <typename I>
PoolGrid<I> pool_grid(at::IntArrayRef full_sizes, int64_t k) {
  return {static_cast<I>(full_sizes[2]), static_cast<I>(full_sizes[3]),
          static_cast<I>(full_sizes[2] / k), static_cast<I>(full_sizes[3] / k), static_cast<I>(k)};
}

// Where pooled element j sits: its plane and its window's row and column, found once per element
// (the divisions are the costly part of these kernels' index maths).
template <typename I>
struct PooledElement {
  I plane, oh, ow;
};

template <typename I>
__device__ inline PooledElement<I> locate(I j, const PoolGrid<I>& g) {
  const I pooled_plane = g.out_h * g.out_w;
  const I plane = j / pooled_plane, q = j - plane * pooled_plane;
  const I oh = q / g.out_w;
  return {plane, oh, q - oh * g.out_w};
}

template <typename I>
__device__ inline bool index_in_own_window(int64_t index, const PooledElement<I>& e,
                                           const PoolGrid<I>& g) {
  return index_in_window(index, g.width, g.k, e.oh, e.ow);
}

// Writes value(at) at every position element e owns (write_owned_window).
template <typename I, typename Value, typename T>
__device__ inline void write_pooled_element(T* out, const PooledElement<I>& e, const PoolGrid<I>& g,
                                            const Value& value) {
  write_owned_window(out + static_cast<int64_t>(e.plane) * g.height * g.width, e.oh, e.ow, g.out_h,
                     g.out_w, g.height, g.width, g.k, value);
}

template <Activation A, typename T, typename I>
__global__ void phi_unpool_difference_kernel(const T* a, const T* a_noise, T alpha,
                                             const int64_t* a_idx, const T* b, const int64_t* b_idx,
                                             T* out, I n, PoolGrid<I> g, T scale) {
  for (I j = blockIdx.x * I(blockDim.x) + threadIdx.x; j < n; j += I(gridDim.x) * blockDim.x) {
    const T pa = phi<A>(a_noise ? a[j] + alpha * a_noise[j] : a[j]);
    const int64_t a_at = a_idx[j], b_at = b ? b_idx[j] : -1;
    const auto e = locate(j, g);
    CUDA_KERNEL_ASSERT(index_in_own_window(a_at, e, g) && (!b || index_in_own_window(b_at, e, g)) &&
                       "dtp_ext: pool indices outside their pool window");
    const T* bj = b ? &b[j] : nullptr;
    write_pooled_element(out, e, g,
                         [&](I at) { return owned_difference<T>(at, a_at, pa, b_at, bj, scale); });
  }
}

template <Activation A, typename T, typename I>
__global__ void phi_difference_kernel(const T* a, const T* a_noise, T alpha, const T* b, T* out,
                                      I n, T scale) {
  for (I i = blockIdx.x * I(blockDim.x) + threadIdx.x; i < n; i += I(gridDim.x) * blockDim.x) {
    const T av = a_noise ? a[i] + alpha * a_noise[i] : a[i];
    out[i] = scale * (phi<A>(av) - b[i]);
  }
}

template <Activation A, typename T, typename I>
__global__ void activation_pool_backward_kernel(const T* s, const int64_t* idx, const T* d, T* out,
                                                I n, PoolGrid<I> g) {
  for (I j = blockIdx.x * I(blockDim.x) + threadIdx.x; j < n; j += I(gridDim.x) * blockDim.x) {
    const T grad = activation_backward<A>(d[j], s[j]);
    if (idx) {
      const int64_t at_max = idx[j];
      const auto e = locate(j, g);
      CUDA_KERNEL_ASSERT(index_in_own_window(at_max, e, g) &&
                         "dtp_ext: pool indices outside their pool window");
      write_pooled_element(out, e, g, [&](I at) {
        return owned_difference<T>(at, at_max, grad, -1, nullptr, T(1));
      });
    } else {
      out[j] = grad;
    }
  }
}

template <Activation A, typename T, typename I>
__global__ void noisy_difference_pooled_kernel(const T* z, const T* s, const int64_t* idx, T* out,
                                               I n, PoolGrid<I> g) {
  for (I j = blockIdx.x * I(blockDim.x) + threadIdx.x; j < n; j += I(gridDim.x) * blockDim.x) {
    const auto e = locate(j, g);
    // The pool ranks phi(z), as the forward pass does (window_takes: ties where phi saturates).
    T best;
    const int64_t best_at =
        window_argmax<A>(z + static_cast<int64_t>(e.plane) * g.height * g.width, 1,
                         int64_t(e.oh) * g.k * g.width + int64_t(e.ow) * g.k, g.width, g.k, best);
    const T phi_best = phi<A>(best);
    const int64_t clean_at = s ? idx[j] : -1;
    CUDA_KERNEL_ASSERT((!s || index_in_own_window(clean_at, e, g)) &&
                       "dtp_ext: pool indices outside their pool window");
    const T* sj = s ? &s[j] : nullptr;
    write_pooled_element(out, e, g, [&](I at) {
      return owned_difference<T>(at, best_at, phi_best, clean_at, sj, T(1));
    });
  }
}

template <Activation A, typename T, typename I>
__global__ void noisy_difference_kernel(const T* z, const T* s, T* out, I n) {
  for (I i = blockIdx.x * I(blockDim.x) + threadIdx.x; i < n; i += I(gridDim.x) * blockDim.x) {
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
  // Pooled: every output written by the element that owns its window (no zero fill).
  auto out = at::empty(z.sizes(), z.options());
  const int64_t n =
      pool > 0 ? z.size(0) * z.size(1) * (z.size(2) / pool) * (z.size(3) / pool) : z.numel();
  if (n == 0) return out.zero_();  // no window: nothing owns the (refused upstream) map
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "noisy_difference_cuda", [&] {
    DTP_DISPATCH_ACTIVATION(activation, [&] {
      with_index_type(z.numel(), [&](auto index) {
        using I = decltype(index);
        const scalar_t* sp = s.defined() ? s.const_data_ptr<scalar_t>() : nullptr;
        if (pool > 0) {
          const auto idx = s.defined() ? idx_in.contiguous() : at::Tensor();
          noisy_difference_pooled_kernel<kAct, scalar_t, I><<<blocks_for(n), kThreads, 0, stream>>>(
              z.const_data_ptr<scalar_t>(), sp,
              s.defined() ? idx.const_data_ptr<int64_t>() : nullptr,
              out.mutable_data_ptr<scalar_t>(), static_cast<I>(n), pool_grid<I>(z.sizes(), pool));
        } else {
          noisy_difference_kernel<kAct, scalar_t, I><<<blocks_for(n), kThreads, 0, stream>>>(
              z.const_data_ptr<scalar_t>(), sp, out.mutable_data_ptr<scalar_t>(),
              static_cast<I>(n));
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return out;
}

template <typename T, typename I>
__global__ void sgd_momentum_update_kernel(T* v, T* buf, const T* h, const T* e, I n, T scale, T wd,
                                           T mu, T step) {
  for (I i = blockIdx.x * I(blockDim.x) + threadIdx.x; i < n; i += I(gridDim.x) * blockDim.x) {
    sgd_momentum_step(v[i], buf[i], h[i], e ? &e[i] : nullptr, scale, wd, mu, step);
  }
}

at::Tensor sgd_momentum_update_cuda(at::Tensor& weight, at::Tensor& momentum_buffer,
                                    const at::Tensor& reconstruction_pairing,
                                    const at::Tensor& noise_pairing, double grad_scale,
                                    double weight_decay, double momentum, double lr) {
  if (is_reduced_float(weight)) {  // no float32 master: the step in float32, rounded once
    auto w = weight.to(at::kFloat);
    auto buf = momentum_buffer.to(at::kFloat);
    auto dot = sgd_momentum_update_cuda(w, buf, reconstruction_pairing, noise_pairing, grad_scale,
                                        weight_decay, momentum, lr);
    weight.copy_(w);
    momentum_buffer.copy_(buf);
    return dot;
  }
  const c10::cuda::CUDAGuard guard(weight.device());
  // Pairings in a lower dtype (bfloat16 products, float32 masters) are read in the weight's.
  // The pass runs in memory order over tensors of one dense layout (the weight's).
  const auto format = dense_format(weight);
  TORCH_INTERNAL_ASSERT(weight.is_contiguous(format) &&
                        momentum_buffer.strides() == weight.strides());
  const auto h = reconstruction_pairing.to(weight.scalar_type()).contiguous(format);
  const auto e = noise_pairing.defined() ? noise_pairing.to(weight.scalar_type()).contiguous(format)
                                         : at::Tensor();
  // <V, H> - 2 <V, E> before the step, by cuBLAS on the current stream (queued ahead of the
  // update).
  auto dot = at::dot(flat(weight), flat(h));
  if (e.defined()) dot.sub_(at::dot(flat(weight), flat(e)), 2.0);
  const int64_t n = weight.numel();
  if (n == 0) return dot;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "sgd_momentum_update_cuda", [&] {
    with_index_type(n, [&](auto index) {
      using I = decltype(index);
      sgd_momentum_update_kernel<scalar_t, I><<<blocks_for(n), kThreads, 0, stream>>>(
          weight.mutable_data_ptr<scalar_t>(), momentum_buffer.mutable_data_ptr<scalar_t>(),
          h.const_data_ptr<scalar_t>(), e.defined() ? e.const_data_ptr<scalar_t>() : nullptr,
          static_cast<I>(n), static_cast<scalar_t>(grad_scale), static_cast<scalar_t>(weight_decay),
          static_cast<scalar_t>(momentum), static_cast<scalar_t>(lr));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return dot;
}

at::Tensor phi_unpool_difference_cuda(const char* op, const at::Tensor& a_in,
                                      const at::Tensor& a_noise_in, double alpha,
                                      const at::Tensor& a_indices_in, const at::Tensor& b_in,
                                      const at::Tensor& b_indices_in, at::IntArrayRef out_sizes,
                                      int64_t pool, Activation activation, double scale,
                                      bool channels_last) {
  TORCH_CHECK(!channels_last, "dtp_ext: channels-last outputs are not implemented on CUDA");
  if (is_reduced_float(a_in)) {  // bfloat16/float16: in float32, rounded once at the end
    return phi_unpool_difference_cuda(op, a_in.to(at::kFloat), to_opmath(a_noise_in), alpha,
                                      a_indices_in, to_opmath(b_in), b_indices_in, out_sizes, pool,
                                      activation, scale, channels_last)
        .to(a_in.scalar_type());
  }
  const c10::cuda::CUDAGuard guard(a_in.device());
  const bool pooled = a_indices_in.defined();
  auto a = a_in.contiguous();
  auto b = b_in.contiguous();
  auto a_noise = a_noise_in.defined() ? a_noise_in.contiguous() : at::Tensor();
  // Pooled: every output written by the element that owns its window (no zero fill).
  auto out = at::empty(out_sizes, a.options());
  at::Tensor a_idx = pooled ? a_indices_in.contiguous() : at::Tensor();
  at::Tensor b_idx = pooled ? b_indices_in.contiguous() : at::Tensor();
  const int64_t n = a.numel();
  if (n == 0) return out.zero_();  // no window: nothing owns the (refused upstream) map
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "phi_unpool_difference_cuda", [&] {
    const scalar_t* noise = a_noise.defined() ? a_noise.const_data_ptr<scalar_t>() : nullptr;
    DTP_DISPATCH_ACTIVATION(activation, [&] {
      with_index_type(out.numel(), [&](auto index) {
        using I = decltype(index);
        if (pooled) {
          phi_unpool_difference_kernel<kAct, scalar_t, I><<<blocks_for(n), kThreads, 0, stream>>>(
              a.const_data_ptr<scalar_t>(), noise, static_cast<scalar_t>(alpha),
              a_idx.const_data_ptr<int64_t>(), b.const_data_ptr<scalar_t>(),
              b_idx.const_data_ptr<int64_t>(), out.mutable_data_ptr<scalar_t>(), static_cast<I>(n),
              pool_grid<I>(out.sizes(), pool), static_cast<scalar_t>(scale));
        } else {
          phi_difference_kernel<kAct, scalar_t, I><<<blocks_for(n), kThreads, 0, stream>>>(
              a.const_data_ptr<scalar_t>(), noise, static_cast<scalar_t>(alpha),
              b.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), static_cast<I>(n),
              static_cast<scalar_t>(scale));
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return out;
}

at::Tensor activation_pool_backward_cuda(const char* op, const at::Tensor& output_in,
                                         const at::Tensor& indices_in, const at::Tensor& delta_in,
                                         at::IntArrayRef out_sizes, int64_t pool,
                                         Activation activation) {
  if (is_reduced_float(output_in)) {  // bfloat16/float16: in float32, rounded once at the end
    return activation_pool_backward_cuda(op, output_in.to(at::kFloat), indices_in,
                                         to_opmath(delta_in), out_sizes, pool, activation)
        .to(output_in.scalar_type());
  }
  const c10::cuda::CUDAGuard guard(output_in.device());
  auto output = output_in.contiguous();
  auto delta = delta_in.contiguous();
  const bool pooled = indices_in.defined();
  auto indices = pooled ? indices_in.contiguous() : at::Tensor();
  // Pooled: every output written by the element that owns its window (no zero fill).
  auto out = at::empty(out_sizes, output.options());
  const int64_t n = output.numel();
  if (n == 0) return out.zero_();  // no window: nothing owns the (refused upstream) map
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(output.scalar_type(), "activation_pool_backward_cuda", [&] {
    DTP_DISPATCH_ACTIVATION(activation, [&] {
      with_index_type(out.numel(), [&](auto index) {
        using I = decltype(index);
        activation_pool_backward_kernel<kAct, scalar_t, I><<<blocks_for(n), kThreads, 0, stream>>>(
            output.const_data_ptr<scalar_t>(), pooled ? indices.const_data_ptr<int64_t>() : nullptr,
            delta.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), static_cast<I>(n),
            pooled ? pool_grid<I>(out.sizes(), pool) : PoolGrid<I>{1, 1, 1, 1, 1});
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
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
      &dtp_ext::sgd_momentum_update_cuda, &dtp_ext::activation_pool_backward_cuda>(m);
}
