// The fused elementwise passes around the big products, as private ops of the library
// (torch.ops.dtp_ext._*, schemas in csrc/dtp_ext.cpp). The algorithms (csrc/ops/) call them
// through the dispatcher with the functions below; each device implements them in its own file
// (csrc/cpu/elementwise_cpu.cpp, csrc/cuda/elementwise_cuda.cu) with the kernel signatures
// below and registers them there through the `schema` adapters. An undefined tensor stands for
// an absent (None) argument on both sides.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <optional>
#include <string>

#include "block_geometry.h"

namespace dtp_ext {

// Kernel signatures, one per pass (what each device implements).
using PhiUnpoolDifferenceKernel =
    at::Tensor (*)(const char* op, const at::Tensor& a, const at::Tensor& a_noise, double alpha,
                   const at::Tensor& a_indices, const at::Tensor& phi_b,
                   const at::Tensor& b_indices, at::IntArrayRef out_sizes, int64_t pool,
                   Activation activation, double scale, bool channels_last);
using NoisyDifferenceKernel = at::Tensor (*)(const at::Tensor& z_noisy,
                                             const at::Tensor& clean_phi_output,
                                             const at::Tensor& clean_indices, Activation activation,
                                             int64_t pool, bool channels_last);
using SgdMomentumUpdateKernel = at::Tensor (*)(at::Tensor& weight, at::Tensor& momentum_buffer,
                                               const at::Tensor& reconstruction_pairing,
                                               const at::Tensor& noise_pairing, double grad_scale,
                                               double weight_decay, double momentum, double lr);
using ActivationPoolBackwardKernel = at::Tensor (*)(const char* op, const at::Tensor& output,
                                                    const at::Tensor& indices,
                                                    const at::Tensor& delta,
                                                    at::IntArrayRef out_sizes, int64_t pool,
                                                    Activation activation);

namespace schema {

using OptionalTensor = std::optional<at::Tensor>;

inline OptionalTensor as_optional(const at::Tensor& t) {
  return t.defined() ? OptionalTensor(t) : OptionalTensor();
}
inline at::Tensor or_undefined(const OptionalTensor& t) { return t.value_or(at::Tensor()); }

// The kernels as the dispatcher sees them: the schema's types (str, Tensor?) on one side, the
// kernel's (const char*, Activation, undefined tensors) on the other.
template <PhiUnpoolDifferenceKernel K>
at::Tensor phi_unpool_difference(c10::string_view op, const at::Tensor& a,
                                 const OptionalTensor& a_noise, double alpha,
                                 const OptionalTensor& a_indices, const at::Tensor& phi_b,
                                 const OptionalTensor& b_indices, at::IntArrayRef out_sizes,
                                 int64_t pool, c10::string_view activation, double scale,
                                 bool channels_last) {
  const std::string name(op);
  return K(name.c_str(), a, or_undefined(a_noise), alpha, or_undefined(a_indices), phi_b,
           or_undefined(b_indices), out_sizes, pool,
           parse_activation(name.c_str(), std::string(activation)), scale, channels_last);
}

template <NoisyDifferenceKernel K>
at::Tensor noisy_difference(const at::Tensor& z_noisy, const OptionalTensor& clean_phi_output,
                            const OptionalTensor& clean_indices, c10::string_view activation,
                            int64_t pool, bool channels_last) {
  return K(z_noisy, or_undefined(clean_phi_output), or_undefined(clean_indices),
           parse_activation("dtp_ext._noisy_difference", std::string(activation)), pool,
           channels_last);
}

template <SgdMomentumUpdateKernel K>
at::Tensor sgd_momentum_update(at::Tensor& weight, at::Tensor& momentum_buffer,
                               const at::Tensor& reconstruction_pairing,
                               const OptionalTensor& noise_pairing, double grad_scale,
                               double weight_decay, double momentum, double lr) {
  return K(weight, momentum_buffer, reconstruction_pairing, or_undefined(noise_pairing), grad_scale,
           weight_decay, momentum, lr);
}

template <ActivationPoolBackwardKernel K>
at::Tensor activation_pool_backward(c10::string_view op, const at::Tensor& output,
                                    const OptionalTensor& indices, const at::Tensor& delta,
                                    at::IntArrayRef out_sizes, int64_t pool,
                                    c10::string_view activation) {
  const std::string name(op);
  return K(name.c_str(), output, or_undefined(indices), delta, out_sizes, pool,
           parse_activation(name.c_str(), std::string(activation)));
}

// A device's registration of its four kernels (at the end of its file, inside
// TORCH_LIBRARY_IMPL(dtp_ext, <device>, m)).
template <PhiUnpoolDifferenceKernel P, NoisyDifferenceKernel N, SgdMomentumUpdateKernel S,
          ActivationPoolBackwardKernel B>
void register_elementwise_kernels(torch::Library& m) {
  m.impl("_phi_unpool_difference", &phi_unpool_difference<P>);
  m.impl("_noisy_difference", &noisy_difference<N>);
  m.impl("_sgd_momentum_update", &sgd_momentum_update<S>);
  m.impl("_activation_pool_backward", &activation_pool_backward<B>);
}

// The dispatcher's handle of a private op; each caller looks it up once, at its first call.
template <typename Signature>
c10::TypedOperatorHandle<Signature> handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").template typed<Signature>();
}

}  // namespace schema

// What the algorithms call (see the schemas in csrc/dtp_ext.cpp for what each pass computes).
inline at::Tensor phi_unpool_difference(const char* op, const at::Tensor& a,
                                        const at::Tensor& a_noise, double alpha,
                                        const at::Tensor& a_indices, const at::Tensor& phi_b,
                                        const at::Tensor& b_indices, at::IntArrayRef out_sizes,
                                        int64_t pool, Activation activation, double scale,
                                        bool channels_last) {
  static const auto op_handle = schema::handle<decltype(schema::phi_unpool_difference<nullptr>)>(
      "dtp_ext::_phi_unpool_difference");
  return op_handle.call(op, a, schema::as_optional(a_noise), alpha, schema::as_optional(a_indices),
                        phi_b, schema::as_optional(b_indices), out_sizes, pool,
                        activation_name(activation), scale, channels_last);
}

inline at::Tensor noisy_difference(const at::Tensor& z_noisy, const at::Tensor& clean_phi_output,
                                   const at::Tensor& clean_indices, Activation activation,
                                   int64_t pool, bool channels_last) {
  static const auto op_handle =
      schema::handle<decltype(schema::noisy_difference<nullptr>)>("dtp_ext::_noisy_difference");
  return op_handle.call(z_noisy, schema::as_optional(clean_phi_output),
                        schema::as_optional(clean_indices), activation_name(activation), pool,
                        channels_last);
}

// Returns <V, H> - 2 <V, E> for the weight V before the step (see the schema).
inline at::Tensor sgd_momentum_update(at::Tensor& weight, at::Tensor& momentum_buffer,
                                      const at::Tensor& reconstruction_pairing,
                                      const at::Tensor& noise_pairing, double grad_scale,
                                      double weight_decay, double momentum, double lr) {
  static const auto op_handle = schema::handle<decltype(schema::sgd_momentum_update<nullptr>)>(
      "dtp_ext::_sgd_momentum_update");
  return op_handle.call(weight, momentum_buffer, reconstruction_pairing,
                        schema::as_optional(noise_pairing), grad_scale, weight_decay, momentum, lr);
}

inline at::Tensor activation_pool_backward(const char* op, const at::Tensor& output,
                                           const at::Tensor& indices, const at::Tensor& delta,
                                           at::IntArrayRef out_sizes, int64_t pool,
                                           Activation activation) {
  static const auto op_handle = schema::handle<decltype(schema::activation_pool_backward<nullptr>)>(
      "dtp_ext::_activation_pool_backward");
  return op_handle.call(op, output, schema::as_optional(indices), delta, out_sizes, pool,
                        activation_name(activation));
}

}  // namespace dtp_ext
