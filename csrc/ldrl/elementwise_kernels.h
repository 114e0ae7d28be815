// The two fused elementwise passes that surround the big products. Each device provides its
// own implementation (elementwise_cpu.cpp, elementwise_cuda.cu); the L-DRL algorithm in
// ldrl_ops.cpp receives them through this table, so CPU and CUDA share one algorithm.
#pragma once

#include "../common/block_geometry.h"

namespace dtp_ext {

struct ElementwiseKernels {
  const char* device;  // "CPU", "CUDA": the dispatch key these kernels are registered for
  // scale * (unpool(phi(a + alpha * a_noise), a_indices) - unpool(phi_b, b_indices)) as a new
  // tensor of `out_sizes` (the pre-pool shape); phi_b is already activated (callers compute the
  // clean phi(s) once per batch). Undefined indices mean "no pool" (elementwise); an undefined
  // a_noise means zero. Only pooled positions are touched: the rest are zeros. `channels_last`
  // asks for the output in channels-last memory (the CPU's layout for large maps; see
  // use_channels_last); devices that never choose it may reject it.
  // Indices outside the pool's input plane are refused with an error naming `op`, checked in
  // the pass that uses them (a device-side assert on CUDA), as max_unpool2d does.
  at::Tensor (*phi_unpool_difference)(const char* op, const at::Tensor& a, const at::Tensor& a_noise,
                                      double alpha, const at::Tensor& a_indices,
                                      const at::Tensor& phi_b, const at::Tensor& b_indices,
                                      at::IntArrayRef out_sizes, Activation activation,
                                      double scale, bool channels_last);
  // The noisy-input difference a = unpool(phi(s_noisy), idx_noisy) - unpool(phi(s), indices)
  // straight from the noisy pre-activation z_noisy = op(x + eps): max-pool and phi are fused in
  // (phi is monotone, so the window's max of phi(z) sits at the max of z). Shape of z_noisy.
  // clean_phi_output is phi(s), the activated clean block output; undefined, the clean term
  // is left out (q = unpool(phi(s_noisy), idx_noisy), what vanilla DTP's loss needs).
  at::Tensor (*noisy_difference)(const at::Tensor& z_noisy, const at::Tensor& clean_phi_output,
                                 const at::Tensor& clean_indices, Activation activation,
                                 int64_t pool, bool channels_last);
  // One SGD-momentum step on the feedback weight with the L-DRL gradient, in a single pass:
  // g = grad_scale * (reconstruction - noise) + weight_decay * V; buf = momentum * buf + g;
  // V -= lr * buf (torch.optim.SGD without dampening or Nesterov). All four contiguous; an
  // undefined noise term is zero (the reconstruction loss's plain gradient).
  void (*sgd_ldrl_update)(at::Tensor& weight, at::Tensor& momentum_buffer,
                          const at::Tensor& reconstruction_pairing,
                          const at::Tensor& noise_pairing, double grad_scale, double weight_decay,
                          double momentum, double lr);
  // unpool(delta * phi'(output), indices): the vector-Jacobian product of pool(phi(.)) at the
  // block's own output, as a tensor of `out_sizes`.
  at::Tensor (*activation_pool_backward)(const char* op, const at::Tensor& output,
                                         const at::Tensor& indices,
                                         const at::Tensor& delta, at::IntArrayRef out_sizes,
                                         Activation activation);
};

extern const ElementwiseKernels kCpuKernels;
#ifdef DTP_WITH_CUDA
extern const ElementwiseKernels kCudaKernels;
#endif

}  // namespace dtp_ext
