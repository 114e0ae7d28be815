// The L-DRL ops, written once against ElementwiseKernels (one table per device). The device
// files (ldrl_cpu.cpp, ldrl_cuda.cu) bind them to the dispatcher with their own table.
#pragma once

#include "elementwise_kernels.h"

namespace dtp_ext {

// SPEC §2.1 for one block with explicit (already scaled) noise: the loss and its gradient with
// respect to the feedback weight and bias, in closed form (no autograd).
std::tuple<at::Tensor, at::Tensor, at::Tensor> ldrl_loss(
    const ElementwiseKernels& kernels, const at::Tensor& x, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& feedback_weight,
    const at::Tensor& noise_x, const at::Tensor& noise_y, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    const std::string& activation, int64_t pool);

// SPEC §2.2 for one block: `iterations` steps of fresh noise, loss, SGD-momentum update of the
// feedback weight and bias (updated in place with their momentum buffers). Returns the loss of
// every iteration. Noise comes from torch's default generator, or from noise_x / noise_y
// (shapes [iterations, *x.shape] and [iterations, *output.shape]) when given.
at::Tensor ldrl_feedback_loop(
    const ElementwiseKernels& kernels, const at::Tensor& x, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, at::Tensor& feedback_weight, at::Tensor& feedback_bias,
    at::Tensor& momentum_weight, at::Tensor& momentum_bias, int64_t iterations, double noise_std,
    double lr, double momentum, double weight_decay, int64_t chunk_iterations,
    const c10::optional<at::Tensor>& noise_x, const c10::optional<at::Tensor>& noise_y,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    const std::string& activation, int64_t pool);

// Vanilla DTP's feedback training (SPEC §5, Lee et al.): `iterations` SGD-momentum steps on
// mean_b sum ((x + eps) - G(F(x + eps)))^2, G unpooling with the noisy pass's indices. Noise
// eps_k from torch's default generator, or noise_x ([iterations, *x.shape]) when given.
at::Tensor reconstruction_feedback_loop(
    const ElementwiseKernels& kernels, const at::Tensor& x, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, at::Tensor& feedback_weight, at::Tensor& feedback_bias,
    at::Tensor& momentum_weight, at::Tensor& momentum_bias, int64_t iterations, double noise_std,
    double lr, double momentum, double weight_decay, int64_t chunk_iterations,
    const c10::optional<at::Tensor>& noise_x, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, const std::string& activation, int64_t pool);

// SPEC §3: delta_in = (G(s) - G(s - scale * delta)) / scale with scale = beta * B.
at::Tensor propagate_target(const ElementwiseKernels& kernels,
                            const c10::optional<at::Tensor>& output,
                            const c10::optional<at::Tensor>& indices, const at::Tensor& delta,
                            const at::Tensor& feedback_weight, double scale,
                            at::IntArrayRef input_sizes, at::IntArrayRef stride,
                            at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                            const std::string& activation, int64_t pool);

// The block's own weight gradients: the local vector-Jacobian product of delta through
// pool(phi(op(x))), using the stored output and pool indices instead of the pre-activation.
std::tuple<at::Tensor, at::Tensor> block_weight_grad(
    const ElementwiseKernels& kernels, const at::Tensor& x,
    const c10::optional<at::Tensor>& output, const c10::optional<at::Tensor>& indices, const at::Tensor& delta, const at::Tensor& weight,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    const std::string& activation, int64_t pool);

}  // namespace dtp_ext
