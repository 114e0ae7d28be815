// Binds the L-DRL ops to one device's elementwise kernels for TORCH_LIBRARY_IMPL.
#pragma once

#include <torch/library.h>

#include "../common/kernel_record.h"
#include "ldrl_ops.h"

namespace dtp_ext {

template <const ElementwiseKernels* K>
struct BoundOps {
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> loss(
      const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
      const at::Tensor& feedback_weight, const at::Tensor& noise_x, const at::Tensor& noise_y,
      at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
      c10::string_view activation, int64_t pool) {
    record_kernel("ldrl_loss", K->device);
    return ldrl_loss(*K, x, weight, bias, feedback_weight, noise_x, noise_y, stride, padding,
                     dilation, groups, std::string(activation), pool);
  }

  static at::Tensor feedback_loop(
      const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
      at::Tensor& feedback_weight, at::Tensor& feedback_bias, at::Tensor& momentum_weight,
      at::Tensor& momentum_bias, int64_t iterations, double noise_std, double lr,
      double momentum, double weight_decay, int64_t chunk_iterations,
      const c10::optional<at::Tensor>& noise_x, const c10::optional<at::Tensor>& noise_y,
      at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
      c10::string_view activation, int64_t pool) {
    record_kernel("ldrl_feedback_loop", K->device);
    return ldrl_feedback_loop(*K, x, weight, bias, feedback_weight, feedback_bias,
                              momentum_weight, momentum_bias, iterations, noise_std, lr,
                              momentum, weight_decay, chunk_iterations, noise_x, noise_y, stride,
                              padding, dilation, groups, std::string(activation), pool);
  }

  static at::Tensor reconstruction_loop(
      const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
      at::Tensor& feedback_weight, at::Tensor& feedback_bias, at::Tensor& momentum_weight,
      at::Tensor& momentum_bias, int64_t iterations, double noise_std, double lr,
      double momentum, double weight_decay, int64_t chunk_iterations,
      const c10::optional<at::Tensor>& noise_x, at::IntArrayRef stride, at::IntArrayRef padding,
      at::IntArrayRef dilation, int64_t groups, c10::string_view activation, int64_t pool) {
    record_kernel("reconstruction_feedback_loop", K->device);
    return reconstruction_feedback_loop(*K, x, weight, bias, feedback_weight, feedback_bias,
                                        momentum_weight, momentum_bias, iterations, noise_std, lr,
                                        momentum, weight_decay, chunk_iterations, noise_x, stride,
                                        padding, dilation, groups, std::string(activation), pool);
  }

  static at::Tensor target(const c10::optional<at::Tensor>& output,
                           const c10::optional<at::Tensor>& indices,
                           const at::Tensor& delta, const at::Tensor& feedback_weight,
                           double scale, at::IntArrayRef input_sizes, at::IntArrayRef stride,
                           at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                           c10::string_view activation, int64_t pool) {
    record_kernel("propagate_target", K->device);
    return propagate_target(*K, output, indices, delta, feedback_weight, scale, input_sizes,
                            stride, padding, dilation, groups, std::string(activation), pool);
  }

  static std::tuple<at::Tensor, at::Tensor> weight_grad(
      const at::Tensor& x, const c10::optional<at::Tensor>& output,
      const c10::optional<at::Tensor>& indices,
      const at::Tensor& delta, const at::Tensor& weight, at::IntArrayRef stride,
      at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
      c10::string_view activation, int64_t pool) {
    record_kernel("block_weight_grad", K->device);
    return block_weight_grad(*K, x, output, indices, delta, weight, stride, padding, dilation,
                             groups, std::string(activation), pool);
  }

  static void register_all(torch::Library& m) {
    m.impl("ldrl_loss", &loss);
    m.impl("ldrl_feedback_loop", &feedback_loop);
    m.impl("reconstruction_feedback_loop", &reconstruction_loop);
    m.impl("propagate_target", &target);
    m.impl("block_weight_grad", &weight_grad);
  }
};

}  // namespace dtp_ext
