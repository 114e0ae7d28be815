// CPU kernels of the fused elementwise passes (the private ops of csrc/common/elementwise_ops.h;
// per-element maths in csrc/common/elementwise_math.h), and the CPU's convolution layout.
//
// On the CPU the activations' transcendental functions (expm1, tanh) run through ATen's
// vectorised kernels on the pooled grid (a quarter of the full-resolution size for 2x2 pools),
// and one scalar pass scatters the pooled values into the zero-filled full-resolution tensor.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>

#include <atomic>

#include "../common/block_products.h"
#include "../common/elementwise_math.h"
#include "../common/elementwise_ops.h"

namespace dtp_ext {
namespace {

// Where plane p = n*C + c of an (N, C, H, W) tensor starts, and the distance between its
// neighbouring elements, in NCHW (contiguous) or NHWC (channels-last) memory.
struct PlaneLayout {
  int64_t channels, plane_size;
  bool channels_last;
  int64_t base(int64_t p) const {
    return channels_last ? (p / channels) * channels * plane_size + p % channels : p * plane_size;
  }
  int64_t step() const { return channels_last ? channels : 1; }
};

PlaneLayout layout_of(const at::Tensor& t) {
  const bool cl =
      t.dim() == 4 && !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast);
  return {t.size(1), t.size(2) * t.size(3), cl};
}

// out = scale * (unpool(a, a_idx) - unpool(b, b_idx)), zero elsewhere; a, b and the indices on
// the pooled grid (NCHW), out in `format`. Planes are disjoint, so threads scatter freely.
// Pool indices address a position of their own window (index_in_window, the rule the CUDA
// passes that own windows rely on); any other value is a caller's error, which the scatter
// passes record (the first bad value and its window) instead of writing it.
struct IndexGuard {
  const char* op;
  int64_t height, width, k;
  std::atomic<bool> bad{false};
  std::atomic<int64_t> value{0}, window{0};
  // `index` belongs to pooled element q (row-major) of its plane.
  bool ok(int64_t index, int64_t q) {
    const int64_t out_w = width / k;
    if (index_in_window(index, width, k, q / out_w, q % out_w)) return true;
    if (!bad.exchange(true)) {
      value = index;
      window = q;
    }
    return false;
  }
  void check() const {
    const int64_t out_w = width / k;
    TORCH_CHECK_INDEX(
        !bad, op, ": indices must lie in [0, ", height * width, "), each in its own ", k, "x", k,
        " pool window of the pool's input plane (as max_pool2d returns them), got ", value.load(),
        " for the window at row ", window.load() / out_w, ", column ", window.load() % out_w);
  }
};

template <typename T>
void scatter_difference_kernel(const T* a, const int64_t* a_idx, const T* b, const int64_t* b_idx,
                               T* out, int64_t planes, int64_t pooled_plane, PlaneLayout layout,
                               T scale, IndexGuard& guard) {
  at::parallel_for(0, planes, 1, [&](int64_t begin, int64_t end) {
    const int64_t step = layout.step();
    for (int64_t p = begin; p < end; ++p) {
      T* o = out + layout.base(p);
      if (!layout.channels_last) std::fill(o, o + layout.plane_size, T(0));
      for (int64_t j = p * pooled_plane; j < (p + 1) * pooled_plane; ++j) {
        const bool a_ok = guard.ok(a_idx[j], j - p * pooled_plane);
        const bool b_ok = b && guard.ok(b_idx[j], j - p * pooled_plane);
        unpool_difference(o, step, a_ok, a_idx[j], a[j], b_ok, b ? b_idx[j] : 0,
                          b ? &b[j] : nullptr, scale);
      }
    }
  });
  guard.check();
}

at::Tensor scatter_difference(const char* op, const at::Tensor& a_in, const at::Tensor& a_idx_in,
                              const at::Tensor& b_in, const at::Tensor& b_idx_in,
                              at::IntArrayRef out_sizes, int64_t pool, double scale,
                              bool channels_last) {
  RECORD_FUNCTION("dtp_ext::scatter_difference", std::vector<c10::IValue>());
  const auto a = a_in.contiguous(), a_idx = a_idx_in.contiguous();
  const bool has_b = b_in.defined();  // an undefined b means no second term
  const auto b = has_b ? b_in.contiguous() : at::Tensor();
  const auto b_idx = has_b ? b_idx_in.contiguous() : at::Tensor();
  // Channels-last planes interleave, so the whole tensor is zeroed up front (at::zeros would
  // ignore the memory format).
  auto out =
      channels_last
          ? at::empty(out_sizes, a.options().memory_format(at::MemoryFormat::ChannelsLast)).zero_()
          : at::empty(out_sizes, a.options());
  const int64_t planes = a.size(0) * a.size(1);
  IndexGuard index_guard{op, out.size(2), out.size(3), pool};
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "scatter_difference_cpu", [&] {
    scatter_difference_kernel<scalar_t>(
        a.const_data_ptr<scalar_t>(), a_idx.const_data_ptr<int64_t>(),
        has_b ? b.const_data_ptr<scalar_t>() : nullptr,
        has_b ? b_idx.const_data_ptr<int64_t>() : nullptr, out.mutable_data_ptr<scalar_t>(), planes,
        a.numel() / planes, PlaneLayout{out.size(1), out.size(2) * out.size(3), channels_last},
        static_cast<scalar_t>(scale), index_guard);
  });
  return out;
}

// Max-pool with kernel = stride = k and its indices, by max-pool's rule (window_takes; the 2x2
// case branch-free, window_argmax_2x2). `es` is the distance between horizontal neighbours (1 in
// NCHW, C in channels-last memory).
template <typename T>
void window_max_2x2(const T* zp, int64_t es, T* op, int64_t* ip, int64_t height, int64_t width) {
  const int64_t out_h = height / 2, out_w = width / 2;
  for (int64_t oh = 0; oh < out_h; ++oh) {
    const T* r0 = zp + 2 * oh * width * es;
    const T* r1 = r0 + width * es;
    for (int64_t ow = 0; ow < out_w; ++ow) {
      const int64_t at = 2 * ow * es;
      ip[oh * out_w + ow] =
          2 * oh * width + 2 * ow +
          window_argmax_2x2(r0[at], r0[at + es], r1[at], r1[at + es], width, op[oh * out_w + ow]);
    }
  }
}

template <typename T>
void window_max_generic(const T* zp, int64_t es, T* op, int64_t* ip, int64_t height, int64_t width,
                        int64_t k) {
  const int64_t out_h = height / k, out_w = width / k;
  for (int64_t oh = 0; oh < out_h; ++oh) {
    for (int64_t ow = 0; ow < out_w; ++ow) {
      // zp holds phi(z) already: ranked as it is.
      ip[oh * out_w + ow] = window_argmax<Activation::Identity>(zp, es, oh * k * width + ow * k,
                                                                width, k, op[oh * out_w + ow]);
    }
  }
}

// Reads z in its own layout (NCHW or channels-last); pooled values and indices come out NCHW.
std::tuple<at::Tensor, at::Tensor> window_max(const at::Tensor& z_in, int64_t k) {
  RECORD_FUNCTION("dtp_ext::window_max", std::vector<c10::IValue>());
  const auto layout = layout_of(z_in);
  const auto z = layout.channels_last ? z_in : z_in.contiguous();
  auto out = at::empty({z.size(0), z.size(1), z.size(2) / k, z.size(3) / k}, z.options());
  auto idx = at::empty(out.sizes(), z.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "window_max_cpu", [&] {
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    int64_t* ip = idx.mutable_data_ptr<int64_t>();
    const int64_t height = z.size(2), width = z.size(3);
    const int64_t pooled = (height / k) * (width / k);
    at::parallel_for(0, z.size(0) * z.size(1), 1, [=](int64_t begin, int64_t end) {
      const int64_t es = layout.step();
      for (int64_t p = begin; p < end; ++p) {
        const scalar_t* plane = zp + layout.base(p);
        if (k == 2) {
          window_max_2x2(plane, es, op + p * pooled, ip + p * pooled, height, width);
        } else {
          window_max_generic(plane, es, op + p * pooled, ip + p * pooled, height, width, k);
        }
      }
    });
  });
  return {out, idx};
}

at::Tensor phi_unpool_difference_cpu(const char* op, const at::Tensor& a, const at::Tensor& a_noise,
                                     double alpha, const at::Tensor& a_indices,
                                     const at::Tensor& phi_b, const at::Tensor& b_indices,
                                     at::IntArrayRef out_sizes, int64_t pool, Activation activation,
                                     double scale, bool channels_last) {
  if (is_reduced_float(a)) {
    // bfloat16/float16: the pass runs on float32 copies (phi, the differences and the scatter
    // in float32; one rounding to a's dtype at the end), which ATen's vectorised activations
    // convert at full speed; the products around it are what run in the low dtype.
    return phi_unpool_difference_cpu(op, a.to(at::kFloat), to_opmath(a_noise), alpha, a_indices,
                                     to_opmath(phi_b), b_indices, out_sizes, pool, activation,
                                     scale, channels_last)
        .to(a.scalar_type());
  }
  const auto phi_a = activate(activation, a_noise.defined() ? a.add(a_noise, alpha) : a);
  if (!a_indices.defined()) return (phi_a - phi_b).mul_(scale).view(out_sizes);
  return scatter_difference(op, phi_a, a_indices, phi_b, b_indices, out_sizes, pool, scale,
                            channels_last);
}

at::Tensor noisy_difference_cpu(const at::Tensor& z, const at::Tensor& clean_phi_output,
                                const at::Tensor& clean_indices, Activation activation,
                                int64_t pool, bool channels_last) {
  if (is_reduced_float(z)) {  // in float32, rounded once at the end (see phi_unpool_difference)
    return noisy_difference_cpu(z.to(at::kFloat), to_opmath(clean_phi_output), clean_indices,
                                activation, pool, channels_last)
        .to(z.scalar_type());
  }
  // The pool ranks phi(z), as the forward pass does (window_takes: ties where phi saturates).
  const auto phi_z = activate(activation, z);
  if (pool == 0) {
    auto a = activate(activation, phi_z);
    return clean_phi_output.defined() ? a.sub_(clean_phi_output) : a;
  }
  const auto pooled = window_max(phi_z, pool);
  const auto phi_noisy = activate(activation, std::get<0>(pooled));
  return scatter_difference("dtp_ext.noisy_difference", phi_noisy, std::get<1>(pooled),
                            clean_phi_output, clean_indices, z.sizes(), pool, 1.0, channels_last);
}

void sgd_ldrl_update_cpu(at::Tensor& weight, at::Tensor& momentum_buffer,
                         const at::Tensor& reconstruction_pairing, const at::Tensor& noise_pairing,
                         double grad_scale, double weight_decay, double momentum, double lr) {
  if (is_reduced_float(weight)) {
    // A bfloat16/float16 weight without a float32 master: the step in float32, rounded once.
    auto w = weight.to(at::kFloat), buf = momentum_buffer.to(at::kFloat);
    sgd_ldrl_update_cpu(w, buf, reconstruction_pairing, noise_pairing, grad_scale, weight_decay,
                        momentum, lr);
    weight.copy_(w);
    momentum_buffer.copy_(buf);
    return;
  }
  // The pairings may be in a lower dtype than the weight (bfloat16/float16 products, float32
  // masters): read and widened element by element in the loop, without a converted copy.
  const auto h = reconstruction_pairing.contiguous();
  const auto e = noise_pairing.defined() ? noise_pairing.contiguous() : at::Tensor();
  TORCH_CHECK(!e.defined() || e.scalar_type() == h.scalar_type(),
              "sgd_ldrl_update: the two pairings must share a dtype");
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "sgd_ldrl_update_cpu", [&] {
    using weight_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kBFloat16, at::kHalf, h.scalar_type(), "sgd_ldrl_update_cpu_pairing", [&] {
          using pairing_t = scalar_t;
          weight_t* v = weight.mutable_data_ptr<weight_t>();
          weight_t* buf = momentum_buffer.mutable_data_ptr<weight_t>();
          const pairing_t* hp = h.const_data_ptr<pairing_t>();
          const pairing_t* ep = e.defined() ? e.const_data_ptr<pairing_t>() : nullptr;
          const auto scale = static_cast<weight_t>(grad_scale);
          const auto wd = static_cast<weight_t>(weight_decay);
          const auto mu = static_cast<weight_t>(momentum);
          const auto step = static_cast<weight_t>(lr);
          at::parallel_for(0, weight.numel(), 4096, [&](int64_t begin, int64_t end) {
            for (int64_t i = begin; i < end; ++i) {
              const auto ei = ep ? static_cast<weight_t>(ep[i]) : weight_t(0);
              sgd_ldrl_step(v[i], buf[i], static_cast<weight_t>(hp[i]), ep ? &ei : nullptr, scale,
                            wd, mu, step);
            }
          });
        });
  });
}

at::Tensor activation_pool_backward_cpu(const char* op, const at::Tensor& output_in,
                                        const at::Tensor& indices_in, const at::Tensor& delta_in,
                                        at::IntArrayRef out_sizes, int64_t pool,
                                        Activation activation) {
  if (is_reduced_float(output_in)) {  // in float32, rounded once at the end
    return activation_pool_backward_cpu(op, output_in.to(at::kFloat), indices_in,
                                        to_opmath(delta_in), out_sizes, pool, activation)
        .to(output_in.scalar_type());
  }
  auto output = output_in.contiguous();
  auto delta = delta_in.contiguous();
  const bool pooled = indices_in.defined();
  auto indices = pooled ? indices_in.contiguous() : at::Tensor();
  auto out = at::empty(out_sizes, output.options());
  if (output.numel() == 0) return out.zero_();  // no pooled element: nothing owns a position
  IndexGuard index_guard{op, pooled ? out.size(2) : 0, pooled ? out.size(3) : 0, pool};
  AT_DISPATCH_FLOATING_TYPES(output.scalar_type(), "activation_pool_backward_cpu", [&] {
    const scalar_t* s = output.const_data_ptr<scalar_t>();
    const scalar_t* d = delta.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    DTP_DISPATCH_ACTIVATION(activation, [&] {
      if (pooled) {
        // Window-owning, as on CUDA (write_owned_window): each pooled element writes every
        // position it owns, so the CPU tests run the GPU's ownership maths.
        const int64_t planes = output.size(0) * output.size(1);
        const int64_t out_h = output.size(2), out_w = output.size(3);
        const int64_t height = out.size(2), width = out.size(3);
        const int64_t* idx = indices.const_data_ptr<int64_t>();
        at::parallel_for(0, planes, 1, [&](int64_t begin, int64_t end) {
          for (int64_t p = begin; p < end; ++p) {
            for (int64_t q = 0; q < out_h * out_w; ++q) {
              const int64_t j = p * out_h * out_w + q;
              // A refused index writes its window's zeros (the op then raises).
              const int64_t at_max = index_guard.ok(idx[j], q) ? idx[j] : -1;
              const scalar_t grad = activation_backward<kAct>(d[j], s[j]);
              write_owned_window<int64_t>(o + p * height * width, q / out_w, q % out_w, out_h,
                                          out_w, height, width, pool, [&](int64_t at) {
                                            return owned_difference<scalar_t>(at, at_max, grad, -1,
                                                                              nullptr, scalar_t(1));
                                          });
            }
          }
        });
        index_guard.check();
      } else {
        at::parallel_for(0, output.numel(), 2048, [&](int64_t begin, int64_t end) {
          for (int64_t i = begin; i < end; ++i) o[i] = activation_backward<kAct>(d[i], s[i]);
        });
      }
    });
  });
  return out;
}

// On the CPU, oneDNN's convolutions on large maps run markedly faster on channels-last tensors
// (measured 1.6-1.8x at 16x16 maps for the three products L-DRL needs) even counting the
// layout conversions; on small maps NCHW is as fast or faster. Output maps with at least this
// many positions run channels-last.
constexpr int64_t kChannelsLastMinPositions = 128;

const bool kCpuLayoutRegistered = register_channels_last_rule(
    c10::DeviceType::CPU, [](int64_t positions) { return positions >= kChannelsLastMinPositions; });

}  // namespace
}  // namespace dtp_ext

TORCH_LIBRARY_IMPL(dtp_ext, CPU, m) {
  dtp_ext::schema::register_elementwise_kernels<
      &dtp_ext::phi_unpool_difference_cpu, &dtp_ext::noisy_difference_cpu,
      &dtp_ext::sgd_ldrl_update_cpu, &dtp_ext::activation_pool_backward_cpu>(m);
}
