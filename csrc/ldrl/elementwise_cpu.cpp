// CPU implementations of the fused elementwise passes (see elementwise_kernels.h).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "../common/activation_math.h"
#include "elementwise_kernels.h"

namespace dtp_ext {
namespace {

// Planes (N*C) are independent: each thread zero-fills its planes and scatters the pooled
// values into them, so the full-resolution tensor is written exactly once.
template <Activation A, typename T>
void phi_unpool_difference_kernel(const T* a, const T* a_noise, T alpha, const int64_t* a_idx,
                                  const T* b, const int64_t* b_idx, T* out, int64_t planes,
                                  int64_t pooled_plane, int64_t full_plane, T scale) {
  at::parallel_for(0, planes, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      T* o = out + p * full_plane;
      std::fill(o, o + full_plane, T(0));
      const int64_t base = p * pooled_plane;
      for (int64_t j = base; j < base + pooled_plane; ++j) {
        const T av = a_noise ? a[j] + alpha * a_noise[j] : a[j];
        o[a_idx[j]] += scale * phi<A>(av);
        o[b_idx[j]] -= scale * phi<A>(b[j]);
      }
    }
  });
}

template <Activation A, typename T>
void phi_difference_kernel(const T* a, const T* a_noise, T alpha, const T* b, T* out,
                           int64_t n, T scale) {
  at::parallel_for(0, n, 2048, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T av = a_noise ? a[i] + alpha * a_noise[i] : a[i];
      out[i] = scale * (phi<A>(av) - phi<A>(b[i]));
    }
  });
}

at::Tensor phi_unpool_difference_cpu(const at::Tensor& a_in, const at::Tensor& a_noise_in,
                                     double alpha, const at::Tensor& a_indices_in,
                                     const at::Tensor& b_in, const at::Tensor& b_indices_in,
                                     at::IntArrayRef out_sizes, Activation activation,
                                     double scale) {
  const bool pooled = a_indices_in.defined();
  auto a = a_in.contiguous();
  auto b = b_in.contiguous();
  auto a_noise = a_noise_in.defined() ? a_noise_in.contiguous() : at::Tensor();
  auto out = at::empty(out_sizes, a.options());
  at::Tensor a_idx, b_idx;
  if (pooled) {
    a_idx = a_indices_in.contiguous();
    b_idx = b_indices_in.contiguous();
  }
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "phi_unpool_difference_cpu", [&] {
    const scalar_t* noise = a_noise.defined() ? a_noise.const_data_ptr<scalar_t>() : nullptr;
    DTP_DISPATCH_ACTIVATION(activation, [&] {
      if (pooled) {
        const int64_t planes = a.size(0) * a.size(1);
        phi_unpool_difference_kernel<kAct, scalar_t>(
            a.const_data_ptr<scalar_t>(), noise, static_cast<scalar_t>(alpha),
            a_idx.const_data_ptr<int64_t>(), b.const_data_ptr<scalar_t>(),
            b_idx.const_data_ptr<int64_t>(), out.mutable_data_ptr<scalar_t>(), planes,
            a.numel() / planes, out.numel() / planes, static_cast<scalar_t>(scale));
      } else {
        phi_difference_kernel<kAct, scalar_t>(a.const_data_ptr<scalar_t>(), noise,
                                              static_cast<scalar_t>(alpha),
                                              b.const_data_ptr<scalar_t>(),
                                              out.mutable_data_ptr<scalar_t>(), a.numel(),
                                              static_cast<scalar_t>(scale));
      }
    });
  });
  return out;
}

at::Tensor activation_pool_backward_cpu(const at::Tensor& output_in, const at::Tensor& indices_in,
                                        const at::Tensor& delta_in, at::IntArrayRef out_sizes,
                                        Activation activation) {
  auto output = output_in.contiguous();
  auto delta = delta_in.contiguous();
  const bool pooled = indices_in.defined();
  auto indices = pooled ? indices_in.contiguous() : at::Tensor();
  auto out = at::empty(out_sizes, output.options());
  AT_DISPATCH_FLOATING_TYPES(output.scalar_type(), "activation_pool_backward_cpu", [&] {
    const scalar_t* s = output.const_data_ptr<scalar_t>();
    const scalar_t* d = delta.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    DTP_DISPATCH_ACTIVATION(activation, [&] {
      if (pooled) {
        const int64_t planes = output.size(0) * output.size(1);
        const int64_t pooled_plane = output.numel() / planes;
        const int64_t full_plane = out.numel() / planes;
        const int64_t* idx = indices.const_data_ptr<int64_t>();
        at::parallel_for(0, planes, 1, [&](int64_t begin, int64_t end) {
          for (int64_t p = begin; p < end; ++p) {
            scalar_t* op = o + p * full_plane;
            std::fill(op, op + full_plane, scalar_t(0));
            for (int64_t j = p * pooled_plane; j < (p + 1) * pooled_plane; ++j) {
              op[idx[j]] += d[j] * phi_prime_from_output<kAct>(s[j]);
            }
          }
        });
      } else {
        at::parallel_for(0, output.numel(), 2048, [&](int64_t begin, int64_t end) {
          for (int64_t i = begin; i < end; ++i) o[i] = d[i] * phi_prime_from_output<kAct>(s[i]);
        });
      }
    });
  });
  return out;
}

// One pass over z: for each window, the first maximum in row-major order (max_pool2d's rule)
// receives phi(phi(max)); the clean pooled position receives -phi(s). Rows and columns that
// the floor-mode pool drops stay zero.
template <Activation A, typename T>
void noisy_difference_pooled_kernel(const T* z, const T* s, const int64_t* idx, T* out,
                                    int64_t planes, int64_t height, int64_t width, int64_t k) {
  const int64_t out_h = height / k, out_w = width / k;
  at::parallel_for(0, planes, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const T* zp = z + p * height * width;
      T* o = out + p * height * width;
      std::fill(o, o + height * width, T(0));
      const int64_t* ip = idx + p * out_h * out_w;
      const T* sp = s + p * out_h * out_w;
      for (int64_t oh = 0; oh < out_h; ++oh) {
        for (int64_t ow = 0; ow < out_w; ++ow) {
          int64_t best_at = oh * k * width + ow * k;
          T best = zp[best_at];
          for (int64_t kh = 0; kh < k; ++kh) {
            for (int64_t kw = 0; kw < k; ++kw) {
              const int64_t at = (oh * k + kh) * width + ow * k + kw;
              if (zp[at] > best || std::isnan(zp[at])) {
                best = zp[at];
                best_at = at;
              }
            }
          }
          const int64_t j = oh * out_w + ow;
          o[best_at] += phi<A>(phi<A>(best));
          o[ip[j]] -= phi<A>(sp[j]);
        }
      }
    }
  });
}

at::Tensor noisy_difference_cpu(const at::Tensor& z_in, const at::Tensor& s_in,
                                const at::Tensor& idx_in, Activation activation, int64_t pool) {
  auto z = z_in.contiguous();
  auto s = s_in.contiguous();
  auto out = at::empty(z.sizes(), z.options());
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "noisy_difference_cpu", [&] {
    DTP_DISPATCH_ACTIVATION(activation, [&] {
      if (pool > 0) {
        auto idx = idx_in.contiguous();
        noisy_difference_pooled_kernel<kAct, scalar_t>(
            z.const_data_ptr<scalar_t>(), s.const_data_ptr<scalar_t>(),
            idx.const_data_ptr<int64_t>(), out.mutable_data_ptr<scalar_t>(),
            z.size(0) * z.size(1), z.size(2), z.size(3), pool);
      } else {
        const scalar_t* zp = z.const_data_ptr<scalar_t>();
        const scalar_t* sp = s.const_data_ptr<scalar_t>();
        scalar_t* o = out.mutable_data_ptr<scalar_t>();
        at::parallel_for(0, z.numel(), 2048, [&](int64_t begin, int64_t end) {
          for (int64_t i = begin; i < end; ++i) o[i] = phi<kAct>(phi<kAct>(zp[i])) - phi<kAct>(sp[i]);
        });
      }
    });
  });
  return out;
}

void sgd_ldrl_update_cpu(at::Tensor& weight, at::Tensor& momentum_buffer,
                         const at::Tensor& reconstruction_pairing,
                         const at::Tensor& noise_pairing, double grad_scale, double weight_decay,
                         double momentum, double lr) {
  const auto h = reconstruction_pairing.contiguous();
  const auto e = noise_pairing.contiguous();
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "sgd_ldrl_update_cpu", [&] {
    scalar_t* v = weight.mutable_data_ptr<scalar_t>();
    scalar_t* buf = momentum_buffer.mutable_data_ptr<scalar_t>();
    const scalar_t* hp = h.const_data_ptr<scalar_t>();
    const scalar_t* ep = e.const_data_ptr<scalar_t>();
    const auto scale = static_cast<scalar_t>(grad_scale);
    const auto wd = static_cast<scalar_t>(weight_decay);
    const auto mu = static_cast<scalar_t>(momentum);
    const auto step = static_cast<scalar_t>(lr);
    at::parallel_for(0, weight.numel(), 4096, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const scalar_t g = scale * (hp[i] - ep[i]) + wd * v[i];
        buf[i] = mu * buf[i] + g;
        v[i] -= step * buf[i];
      }
    });
  });
}

}  // namespace

const ElementwiseKernels kCpuKernels{&phi_unpool_difference_cpu, &noisy_difference_cpu,
                                     &sgd_ldrl_update_cpu, &activation_pool_backward_cpu};

}  // namespace dtp_ext
