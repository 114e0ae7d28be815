// The per-element maths of the fused elementwise passes, written once for both devices: the CPU
// kernels (csrc/cpu/) and the CUDA kernels (csrc/cuda/) only loop over elements and call these,
// so the CPU tests exercise the arithmetic the GPU runs.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "block_geometry.h"

namespace dtp_ext {

// ATen's rules, on both devices: relu keeps NaN (as clamp_min does).
template <Activation A, typename T>
C10_HOST_DEVICE inline T phi(T v) {
  if constexpr (A == Activation::ReLU) return v <= T(0) ? T(0) : v;
  if constexpr (A == Activation::ELU) return v > T(0) ? v : ::expm1(v);
  if constexpr (A == Activation::Tanh) return ::tanh(v);
  return v;
}

// phi'(z) written in terms of the activation's output h = phi(z). Max-pool keeps h values at
// the pooled positions, so the block output is all the backward pass needs (no stored z).
template <Activation A, typename T>
C10_HOST_DEVICE inline T phi_prime_from_output(T h) {
  if constexpr (A == Activation::ReLU) return h > T(0) ? T(1) : T(0);
  if constexpr (A == Activation::ELU) return h > T(0) ? T(1) : h + T(1);
  if constexpr (A == Activation::Tanh) return T(1) - h * h;
  return T(1);
}

// phi(phi(z)): the unpooled noisy term of a block without pool (the pool ranks phi(z), and the
// loss's difference is taken after the activation once more, as the official code does).
template <Activation A, typename T>
C10_HOST_DEVICE inline T phi_of_phi(T z) {
  return phi<A>(phi<A>(z));
}

// Max-pool's rule (ATen's max_pool2d): scanning a window in row-major order, a value takes the
// place of the best so far when it is larger or NaN, so the first maximum wins and a NaN beats
// everything. Applied to phi(z), as the official code pools phi(op(x)): where phi saturates
// (tanh, ELU far below 0) positions with different z tie, and the first one wins.
// (Both comparisons are evaluated, without a branch: which entry wins is data.)
template <typename T>
C10_HOST_DEVICE inline bool window_takes(T candidate, T best) {
  return (candidate > best) | (candidate != candidate);
}

// The k x k window of a plane (`width` wide, neighbours `es` elements apart) starting at
// position `first`, ranked by rank(value) (max-pool's rule) in a row-major scan, for any k:
// returns where the window's maximum sits (a position of the plane) and stores its rank in
// `best`. (The CPU's window_argmax_2x2_or_scan takes 2x2 windows branch-free instead.)
template <typename T, typename Rank, typename R>
C10_HOST_DEVICE inline int64_t window_argmax_scan(const T* plane, int64_t es, int64_t first,
                                                  int64_t width, int64_t k, const Rank& rank,
                                                  R& best) {
  int64_t best_at = first;
  best = rank(plane[first * es]);
  for (int64_t kh = 0; kh < k; ++kh) {
    for (int64_t kw = 0; kw < k; ++kw) {
      const int64_t at = first + kh * width + kw;
      const R v = rank(plane[at * es]);
      if (window_takes(v, best)) {
        best = v;
        best_at = at;
      }
    }
  }
  return best_at;
}

// Ranks a value by phi<A> of it, as the pool ranks phi(z).
template <Activation A>
struct PhiRank {
  template <typename T>
  C10_HOST_DEVICE T operator()(T v) const {
    return phi<A>(v);
  }
};

// The window ranked by phi<A> of its values.
template <Activation A, typename T>
C10_HOST_DEVICE inline int64_t window_argmax(const T* plane, int64_t es, int64_t first,
                                             int64_t width, int64_t k, T& best) {
  return window_argmax_scan(plane, es, first, width, k, PhiRank<A>{}, best);
}

// The same rule on a 2x2 window (v0 v1 / v2 v3), branch-free as a tournament (v0 vs v1, v2 vs
// v3, then the winners), which gives the row-major scan's answer: where the maximum sits is
// data, not a pattern, and branches mispredict on every other window. The winners are picked
// by index from the window's values (integer selections; a float ?: compiled to branches).
// Returns the maximum's offset from v0's position in a plane `width` wide.
template <typename T>
C10_HOST_DEVICE inline int64_t window_argmax_2x2(T v0, T v1, T v2, T v3, int64_t width, T& best) {
  const T v[4] = {v0, v1, v2, v3};
  const int i01 = window_takes(v1, v0), i23 = 2 + window_takes(v3, v2);
  // i23 if it takes i01's place, by a mask (a ?: here compiled to two branches as well).
  const int i = i01 ^ ((i01 ^ i23) & -static_cast<int>(window_takes(v[i23], v[i01])));
  best = v[i];
  return (i >> 1) * width + (i & 1);
}

// Max-pool windows (kernel = stride = k, no padding) tile the plane's top-left k*out_h x
// k*out_w corner, and a max-pool index addresses a position of its own window (what
// max_pool2d returns; max_unpool2d only checks the plane, but an index elsewhere is not a
// pool's). Checked for the pooled element at (oh, ow) of a plane `width` wide.
// Without divisions or data-dependent branches (a pass checks two indices per pooled element;
// 64-bit divisions and mispredicted branches made the check cost more than the pass): the
// index must be first + r * width + c with 0 <= r, c < k, first the window's first position
// (unsigned arithmetic: exact for any int64 index, modulo 2^64).
C10_HOST_DEVICE inline bool index_in_window(int64_t index, int64_t width, int64_t k, int64_t oh,
                                            int64_t ow) {
  const uint64_t offset =
      static_cast<uint64_t>(index) - static_cast<uint64_t>((oh * width + ow) * k);
  bool inside = false;
  for (int64_t r = 0; r < k; ++r) {
    inside |= offset - static_cast<uint64_t>(r * width) < static_cast<uint64_t>(k);
  }
  return inside;
}

// The positions a window-owning pass writes for pooled element `o` of `count` along one axis
// of `size` positions: its window, widened to the plane's edge for the last window (the
// positions no window covers, when size is not a multiple of k). Every position of the plane
// is owned by exactly one pooled element.
struct OwnedSpan {
  int64_t begin, end;
};
C10_HOST_DEVICE inline OwnedSpan owned_span(int64_t o, int64_t count, int64_t size, int64_t k) {
  return {o * k, o + 1 == count ? size : (o + 1) * k};
}

// Calls visit(at) for every position `at` of its plane (`width` wide, `height` high) that
// pooled element (oh, ow) of an out_h x out_w grid owns, row by row.
template <typename I, typename Visit>
C10_HOST_DEVICE inline void for_each_owned_position(I oh, I ow, I out_h, I out_w, I height, I width,
                                                    I k, const Visit& visit) {
  const OwnedSpan rows = owned_span(oh, out_h, height, k);
  const OwnedSpan cols = owned_span(ow, out_w, width, k);
  for (I r = static_cast<I>(rows.begin); r < static_cast<I>(rows.end); ++r) {
    for (I c = static_cast<I>(cols.begin); c < static_cast<I>(cols.end); ++c) visit(r * width + c);
  }
}

// Writes value(at) at every position of its (contiguous) plane that pooled element (oh, ow)
// owns: the window-owning form of the pooled passes, which writes every output once instead of
// zero-filling and scattering.
template <typename I, typename T, typename Value>
C10_HOST_DEVICE inline void write_owned_window(T* plane, I oh, I ow, I out_h, I out_w, I height,
                                               I width, I k, const Value& value) {
  for_each_owned_position(oh, ow, out_h, out_w, height, width, k,
                          [&](I at) { plane[at] = value(at); });
}

// x * y rounded on its own, on both devices: nvcc would otherwise fuse `v - scale * b` into
// one fused multiply-add and the GPU's bits would differ from the CPU's (whose build forms no
// fused multiply-adds: -ffp-contract=off in setup.py).
template <typename T>
C10_HOST_DEVICE inline T rounded_product(T x, T y) {
#ifdef __CUDA_ARCH__
  if constexpr (std::is_same_v<T, float>) return __fmul_rn(x, y);
  if constexpr (std::is_same_v<T, double>) return __dmul_rn(x, y);
#endif
  return x * y;
}

// The value of scale * (unpool(a) - unpool(b)) at position `at` of a window that a single pooled
// element owns (a at a_at, b at b_at when there is a second term; -1: nowhere): the additions,
// in the order, of scattering a and then b into a zero-filled plane (max_unpool2d(a) -
// max_unpool2d(b)), each position computed once in T.
template <typename T>
C10_HOST_DEVICE inline T owned_difference(int64_t at, int64_t a_at, T a, int64_t b_at, const T* b,
                                          T scale) {
  T v = T(0);
  if (at == a_at) v += rounded_product(scale, a);
  if (b && at == b_at) v -= rounded_product(scale, *b);
  return v;
}

// One element of the vector-Jacobian product of phi at the block output h: delta * phi'(z).
template <Activation A, typename T>
C10_HOST_DEVICE inline T activation_backward(T delta, T h) {
  return delta * phi_prime_from_output<A>(h);
}

// One SGD-momentum step on one element of a feedback parameter (torch.optim.SGD without
// dampening or Nesterov) with the gradient g = grad_scale * (h - e) + weight_decay * v (L-DRL's
// for the feedback weight; without a noise pairing e, grad_scale * h + weight_decay * v: the
// reconstruction loss's, and the feedback bias's).
template <typename T>
C10_HOST_DEVICE inline void sgd_momentum_step(T& v, T& buf, T h, const T* e, T grad_scale,
                                              T weight_decay, T momentum, T lr) {
  const T g = grad_scale * (e ? h - *e : h) + weight_decay * v;
  buf = momentum * buf + g;
  v -= lr * buf;
}

}  // namespace dtp_ext

// Runs BODY with a constexpr `kAct` bound to the runtime activation.
#define DTP_DISPATCH_ACTIVATION(ACT, ...)                      \
  [&] {                                                        \
    switch (ACT) {                                             \
      case ::dtp_ext::Activation::ReLU: {                      \
        constexpr auto kAct = ::dtp_ext::Activation::ReLU;     \
        return __VA_ARGS__();                                  \
      }                                                        \
      case ::dtp_ext::Activation::ELU: {                       \
        constexpr auto kAct = ::dtp_ext::Activation::ELU;      \
        return __VA_ARGS__();                                  \
      }                                                        \
      case ::dtp_ext::Activation::Tanh: {                      \
        constexpr auto kAct = ::dtp_ext::Activation::Tanh;     \
        return __VA_ARGS__();                                  \
      }                                                        \
      default: {                                               \
        constexpr auto kAct = ::dtp_ext::Activation::Identity; \
        return __VA_ARGS__();                                  \
      }                                                        \
    }                                                          \
  }()
