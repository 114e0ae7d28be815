// Scalar maths shared by the CPU and CUDA elementwise kernels.
#pragma once

#include <cmath>

#include "block_geometry.h"

#if defined(__CUDACC__)
#define DTP_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DTP_HOST_DEVICE inline
#endif

namespace dtp_ext {

// ATen's rules, on both devices: relu keeps NaN (as clamp_min does).
template <Activation A, typename T>
DTP_HOST_DEVICE T phi(T v) {
  if constexpr (A == Activation::ReLU) return v <= T(0) ? T(0) : v;
  if constexpr (A == Activation::ELU) return v > T(0) ? v : ::expm1(v);
  if constexpr (A == Activation::Tanh) return ::tanh(v);
  return v;
}

// phi'(z) written in terms of the activation's output h = phi(z). Max-pool keeps h values at
// the pooled positions, so the block output is all the backward pass needs (no stored z).
template <Activation A, typename T>
DTP_HOST_DEVICE T phi_prime_from_output(T h) {
  if constexpr (A == Activation::ReLU) return h > T(0) ? T(1) : T(0);
  if constexpr (A == Activation::ELU) return h > T(0) ? T(1) : h + T(1);
  if constexpr (A == Activation::Tanh) return T(1) - h * h;
  return T(1);
}

// Max-pool's rule (ATen's max_pool2d): scanning a window in row-major order, a value takes the
// place of the best so far when it is larger or NaN, so the first maximum wins and a NaN beats
// everything. Applied to phi(z), as the official code pools phi(op(x)): where phi saturates
// (tanh, ELU far below 0) positions with different z tie, and the first one wins.
template <typename T>
DTP_HOST_DEVICE bool window_takes(T candidate, T best) {
  return candidate > best || candidate != candidate;
}

}  // namespace dtp_ext

// Runs BODY with a constexpr `kAct` bound to the runtime activation.
#define DTP_DISPATCH_ACTIVATION(ACT, ...)                                   \
  [&] {                                                                     \
    switch (ACT) {                                                          \
      case ::dtp_ext::Activation::ReLU: {                                   \
        constexpr auto kAct = ::dtp_ext::Activation::ReLU;                  \
        return __VA_ARGS__();                                               \
      }                                                                     \
      case ::dtp_ext::Activation::ELU: {                                    \
        constexpr auto kAct = ::dtp_ext::Activation::ELU;                   \
        return __VA_ARGS__();                                               \
      }                                                                     \
      case ::dtp_ext::Activation::Tanh: {                                   \
        constexpr auto kAct = ::dtp_ext::Activation::Tanh;                  \
        return __VA_ARGS__();                                               \
      }                                                                     \
      default: {                                                            \
        constexpr auto kAct = ::dtp_ext::Activation::Identity;              \
        return __VA_ARGS__();                                               \
      }                                                                     \
    }                                                                       \
  }()
