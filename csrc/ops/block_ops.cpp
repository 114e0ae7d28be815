// The five public ops of dtp_ext (schemas in csrc/dtp_ext.cpp), written once for every device:
// checks, the big products through ATen (csrc/common/block_products.h) and the fused
// elementwise passes through the dispatcher (csrc/common/elementwise_ops.h), which runs each
// device's own kernels. Registered for the CPU and, in CUDA builds, for CUDA at the end.
#include <ATen/MemoryOverlap.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include "../common/block_products.h"
#include "../common/elementwise_ops.h"
#include "../common/finite_check.h"
#include "../common/interrupt.h"
#include "../common/kernel_record.h"

namespace dtp_ext {
namespace {

at::Tensor optional_or_undefined(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? *t : at::Tensor();
}

const at::Tensor* optional_ptr(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? &*t : nullptr;
}

// What every op does first: records that it runs on `device` (kernel_record.h: the dispatcher
// chose this kernel for tensors there) and parses its geometry.
BlockGeometry start_op(const char* op, const at::Device& device, const at::Tensor& weight,
                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                       int64_t groups, c10::string_view activation, int64_t pool) {
  record_kernel(op, device.type());
  return parse_geometry(op, weight, stride, padding, dilation, groups, std::string(activation),
                        pool);
}

void check_shape(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef expected) {
  TORCH_CHECK(t.sizes() == expected, op, ": ", name, " must have shape ", expected, ", got ",
              t.sizes());
}

// The clean pass and phi(s), computed once per batch and shared by every iteration.
struct CleanPass {
  BlockOutput block;
  at::Tensor phi_output;
};

CleanPass clean_pass(const BlockGeometry& g, const at::Tensor& x, const at::Tensor& weight,
                     const c10::optional<at::Tensor>& bias,
                     const at::Tensor& unrolled = at::Tensor()) {
  CleanPass clean{forward_block(g, x, weight, bias, unrolled), at::Tensor()};
  // phi(s) in float32 when x is bfloat16/float16: the differences phi(s + eta) - phi(s) are
  // formed in float32 (rounding phi(s) first would put bfloat16's error into every one).
  clean.phi_output = activate(g.activation, to_opmath(clean.block.output)).contiguous();
  return clean;
}

// One L-DRL evaluation (docs/maths.md §2) given the clean pass and the noisy pre-activation
// op(x + eps) + bias:
//   a = phi(unpool(F(x+eps))) - phi(unpool(y)),  u = phi(unpool(y+eta)) - phi(unpool(y)),
//   E = pairing(eps, a)  (independent of V),  H = pairing(V.u, u),
//   loss = (-2 <V, E> + |V.u|^2) / B,  dloss/dV = 2 (H - E) / B,  dloss/dc = 0.
// Neither G(y) nor any bias is evaluated: they cancel in every difference. B times the loss is
// |V.u|^2 - 2 <V, E> = <V, H> - 2 <V, E> (<V, pairing(p, q)> = <p, V.q>, so <V, H> = |V.u|^2):
// ldrl_loss takes the first form's dots, a loop's SGD pass returns the second as it reads V, H
// and E for the step; callers divide by B once, a loop once per call.

struct LdrlTerms {
  at::Tensor feedback_u;              // V.u
  at::Tensor reconstruction_pairing;  // H
  at::Tensor noise_pairing;           // E
};

// `feedback_weight` is V in the products' dtype and layout.
LdrlTerms ldrl_terms(const BlockGeometry& g, const CleanPass& clean, at::IntArrayRef x_sizes,
                     const at::Tensor& feedback_weight, const at::Tensor& eps,
                     const at::Tensor& noisy_preactivation, const at::Tensor& eta) {
  LdrlTerms terms;
  if (pairs_in_float32(g, eps, noisy_preactivation, feedback_weight)) {
    // Low precision whose pairings run in float32 (CPU convs): a and u stay float32 from their
    // elementwise passes into the pairings (no rounding to the low dtype and back); only u is
    // rounded for the transposed conv, and V u is converted once for its pairing and the dot.
    const auto a = noisy_difference(noisy_preactivation.to(at::kFloat), clean.phi_output,
                                    clean.block.indices, g.activation, g.pool, g.channels_last);
    terms.noise_pairing = feedback_pairing(g, eps, a, feedback_weight);
    const auto u = phi_unpool_difference("dtp_ext.ldrl_loss", to_opmath(clean.block.output),
                                         to_opmath(eta), 1.0, clean.block.indices, clean.phi_output,
                                         clean.block.indices, clean.block.pre_pool_sizes, g.pool,
                                         g.activation, 1.0, g.channels_last);
    const auto feedback_u =
        apply_feedback(g, u.to(feedback_weight.scalar_type()), feedback_weight, x_sizes)
            .to(at::kFloat);
    terms.reconstruction_pairing = feedback_pairing(g, feedback_u, u, feedback_weight);
    terms.feedback_u = feedback_u;
    return terms;
  }
  const auto a = noisy_difference(noisy_preactivation, clean.phi_output, clean.block.indices,
                                  g.activation, g.pool, g.channels_last);
  terms.noise_pairing = feedback_pairing(g, eps, a, feedback_weight);
  const auto u = phi_unpool_difference(
      "dtp_ext.ldrl_loss", clean.block.output, eta, 1.0, clean.block.indices, clean.phi_output,
      clean.block.indices, clean.block.pre_pool_sizes, g.pool, g.activation, 1.0, g.channels_last);
  terms.feedback_u = apply_feedback(g, u, feedback_weight, x_sizes);
  terms.reconstruction_pairing = feedback_pairing(g, terms.feedback_u, u, feedback_weight);
  return terms;
}

void check_noise(const char* op, const char* name, const at::Tensor& noise,
                 at::IntArrayRef expected, const at::Tensor& x) {
  check_same_device_dtype(op, name, noise, x);
  check_shape(op, name, noise, expected);
}

// docs/maths.md §2 for one block with explicit (already scaled) noise: the loss and its gradient
// with respect to the feedback weight and bias, in closed form (no autograd).
std::tuple<at::Tensor, at::Tensor, at::Tensor> ldrl_loss(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& feedback_weight, const at::Tensor& noise_x, const at::Tensor& noise_y,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    c10::string_view activation, int64_t pool) {
  constexpr const char* op = "dtp_ext.ldrl_loss";
  auto g = start_op(op, x.device(), weight, stride, padding, dilation, groups, activation, pool);
  check_block_tensors(op, g, x, weight, bias);
  check_feedback_weight(op, g, weight, feedback_weight, x);
  use_channels_last(g, x.sizes(), x.device());
  check_noise(op, "noise_x", noise_x, x.sizes(), x);
  check_noise(op, "noise_y", noise_y, block_output_sizes(g, x.sizes(), weight), x);
  check_finite(op, {{"x", &x},
                    {"weight", &weight},
                    {"bias", optional_ptr(bias)},
                    {"feedback_weight", &feedback_weight},
                    {"noise_x", &noise_x},
                    {"noise_y", &noise_y}});

  const auto clean = clean_pass(g, x, weight, bias);
  auto terms = ldrl_terms(g, clean, x.sizes(), feedback_weight, noise_x,
                          preactivation(g, x + noise_x, weight, bias), noise_y);
  // The loss's dots are reductions: float32 when the products ran in bfloat16/float16 (at::dot
  // would return, and round to, the input dtype).
  const auto fu = to_opmath(flat(terms.feedback_u));
  const auto batch_loss = at::sub(
      at::dot(fu, fu),
      at::dot(to_opmath(feedback_weight.reshape(-1)), to_opmath(terms.noise_pairing.reshape(-1))),
      2.0);
  // H - E in float32 (the two pairings nearly cancel once V approaches W^T), returned in the
  // feedback weight's dtype.
  auto grad_weight = (to_opmath(terms.reconstruction_pairing) - to_opmath(terms.noise_pairing))
                         .mul_(2.0 / static_cast<double>(x.size(0)))
                         .to(feedback_weight.scalar_type())
                         .contiguous();
  auto grad_bias = at::zeros({x.size(1)}, x.options());
  return {batch_loss.div_(static_cast<double>(x.size(0))), grad_weight, grad_bias};
}

// What both feedback losses' loops share: argument checks (check_feedback_loop), then noise
// drawn per iteration (eps_k, then eta_k where the loss uses it) from torch's generator or
// taken from explicit tensors, and F(x + eps) batched over chunks of iterations
// (run_feedback_loop). `iteration` receives (eps, x + eps, op(x + eps) + bias, eta) in the
// convolutions' layout and returns the loss. A loop op gathers its arguments here once, by
// name; the geometry arguments are parsed into `g`.
struct FeedbackLoopArgs {
  const char* op;
  BlockGeometry g;
  const at::Tensor& x;
  const at::Tensor& weight;
  const c10::optional<at::Tensor>& bias;
  at::Tensor& feedback_weight;
  at::Tensor& feedback_bias;
  at::Tensor& momentum_weight;
  at::Tensor& momentum_bias;
  int64_t iterations;
  double noise_std, lr, momentum, weight_decay;
  int64_t chunk_iterations;
  const c10::optional<at::Tensor>& noise_x;
  const c10::optional<at::Tensor>& noise_y;  // absent for a loss without eta
  bool draws_eta;
};

// at::empty, with an allocation failure reported against the argument that asked for it.
at::Tensor allocate(const char* op, const char* argument, at::IntArrayRef sizes,
                    const at::TensorOptions& options) {
  try {
    return at::empty(sizes, options);
  } catch (const c10::Error& e) {
    TORCH_CHECK(false, op, ": ", argument, " asks for a tensor of shape ", sizes,
                " that cannot be allocated (", e.what_without_backtrace(), ")");
  } catch (const std::bad_alloc&) {
    TORCH_CHECK(false, op, ": ", argument, " asks for a tensor of shape ", sizes,
                " that cannot be allocated");
  }
}

std::vector<int64_t> noise_shape(at::IntArrayRef sizes, int64_t count) {
  std::vector<int64_t> shape{count};
  shape.insert(shape.end(), sizes.begin(), sizes.end());
  return shape;
}

// The loops write their state in place: a written tensor may not overlap itself (an expanded
// tensor) or any other argument, or the loop would overwrite what it reads (ATen's rule for
// out= arguments, assert_no_overlap).
void check_no_overlap(const char* op, std::initializer_list<NamedTensor> written,
                      std::initializer_list<NamedTensor> read) {
  for (auto w = written.begin(); w != written.end(); ++w) {
    TORCH_CHECK(at::has_internal_overlap(*w->second) != at::MemOverlap::Yes, op, ": ", w->first,
                " has elements that share memory (e.g. an expanded tensor); the loop writes it in "
                "place");
    auto refuse = [&](const NamedTensor& other) {
      if (other.second == nullptr || !other.second->defined()) return;
      const auto status = at::get_overlap_status(*w->second, *other.second);
      TORCH_CHECK(status != at::MemOverlapStatus::Full && status != at::MemOverlapStatus::Partial,
                  op, ": ", w->first, " and ", other.first, " share memory; the loop writes ",
                  w->first, " in place, so it must not overlap any other argument");
    };
    for (auto o = std::next(w); o != written.end(); ++o) refuse(*o);
    for (const auto& r : read) refuse(r);
  }
}

// The loops' state (feedback bias, momentum buffers) has the feedback weight's dtype: x's, or
// float32 master copies when x is bfloat16/float16 (check_feedback_weight with allow_master).
void check_state(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x,
                 const at::Tensor& feedback_weight) {
  if (feedback_weight.scalar_type() == x.scalar_type()) {
    check_same_device_dtype(op, name, t, x);
    return;
  }
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on ", x.device(), " like x, got ",
              t.device());
  TORCH_CHECK(t.scalar_type() == feedback_weight.scalar_type(), op, ": ", name, " must have dtype ",
              feedback_weight.scalar_type(), " like feedback_weight (a float32 master copy), got ",
              t.scalar_type());
}

// Validates every argument of a feedback loop and picks the convolutions' layout.
void check_feedback_loop(FeedbackLoopArgs& a) {
  const char* op = a.op;
  auto& g = a.g;
  const auto& x = a.x;
  check_block_tensors(op, g, x, a.weight, a.bias);
  check_feedback_weight(op, g, a.weight, a.feedback_weight, x, /*allow_master=*/true);
  TORCH_CHECK(a.iterations >= 0, op, ": iterations must be >= 0, got ", a.iterations);
  TORCH_CHECK(a.noise_std >= 0 && std::isfinite(a.noise_std), op,
              ": noise_std must be finite and >= 0, got ", a.noise_std);
  TORCH_CHECK(a.lr >= 0 && std::isfinite(a.lr), op, ": lr must be finite and >= 0, got ", a.lr);
  TORCH_CHECK(a.momentum >= 0 && a.momentum < 1, op, ": momentum must be in [0, 1), got ",
              a.momentum);
  TORCH_CHECK(a.weight_decay >= 0 && std::isfinite(a.weight_decay), op,
              ": weight_decay must be finite and >= 0, got ", a.weight_decay);
  TORCH_CHECK(a.chunk_iterations >= 1, op, ": chunk_iterations must be >= 1, got ",
              a.chunk_iterations);
  use_channels_last(g, x.sizes(), x.device());
  const int64_t in_dim = x.size(1);
  check_state(op, "feedback_bias", a.feedback_bias, x, a.feedback_weight);
  check_shape(op, "feedback_bias", a.feedback_bias, {in_dim});
  check_state(op, "momentum_weight", a.momentum_weight, x, a.feedback_weight);
  check_shape(op, "momentum_weight", a.momentum_weight, a.feedback_weight.sizes());
  check_state(op, "momentum_bias", a.momentum_bias, x, a.feedback_weight);
  check_shape(op, "momentum_bias", a.momentum_bias, {in_dim});

  const auto output_sizes = block_output_sizes(g, x.sizes(), a.weight);
  if (a.noise_x.has_value()) {
    check_noise(op, "noise_x", *a.noise_x, noise_shape(x.sizes(), a.iterations), x);
  }
  if (a.noise_y.has_value()) {
    check_noise(op, "noise_y", *a.noise_y, noise_shape(output_sizes, a.iterations), x);
  }
  TORCH_CHECK(!a.draws_eta || a.noise_x.has_value() == a.noise_y.has_value(), op,
              ": noise_x and noise_y must be given together or not at all");
  check_no_overlap(op,
                   {{"feedback_weight", &a.feedback_weight},
                    {"feedback_bias", &a.feedback_bias},
                    {"momentum_weight", &a.momentum_weight},
                    {"momentum_bias", &a.momentum_bias}},
                   {{"x", &x},
                    {"weight", &a.weight},
                    {"bias", optional_ptr(a.bias)},
                    {"noise_x", optional_ptr(a.noise_x)},
                    {"noise_y", optional_ptr(a.noise_y)}});
  check_finite(op, {{"x", &x},
                    {"weight", &a.weight},
                    {"bias", optional_ptr(a.bias)},
                    {"feedback_weight", &a.feedback_weight},
                    {"feedback_bias", &a.feedback_bias},
                    {"momentum_weight", &a.momentum_weight},
                    {"momentum_bias", &a.momentum_bias},
                    {"noise_x", optional_ptr(a.noise_x)},
                    {"noise_y", optional_ptr(a.noise_y)}});
}

// The loop itself, on arguments check_feedback_loop accepted.
template <typename Iteration>
at::Tensor run_feedback_loop(const FeedbackLoopArgs& a, const at::Tensor& unrolled_weight,
                             Iteration iteration) {
  const auto& g = a.g;
  const auto &x = a.x, &weight = a.weight;
  const auto &bias = a.bias, &noise_x = a.noise_x, &noise_y = a.noise_y;
  const auto output_sizes = block_output_sizes(g, x.sizes(), weight);
  const auto x_conv = conv_layout(g, x.contiguous());
  const int64_t batch = x.size(0);
  // Losses are reductions: float32 when x is bfloat16/float16.
  auto losses = allocate(a.op, "iterations", {a.iterations},
                         x.options().dtype(is_reduced_float(x) ? at::kFloat : x.scalar_type()));
  InterruptPoll interrupts;
  for (int64_t start = 0; start < a.iterations; start += a.chunk_iterations) {
    const int64_t count = std::min(a.chunk_iterations, a.iterations - start);
    std::vector<at::Tensor> chunk_losses(count);
    // Noise is drawn eps_k (then eta_k) for each iteration k, so the stream of random numbers
    // (and so the result) does not depend on chunk_iterations.
    // eps_k of the chunk, in x's dtype and the convolutions' layout (the operand of the noise
    // pairing; x + eps is formed from it).
    at::Tensor eps_conv;
    std::vector<at::Tensor> eta(count);
    const auto chunk_sizes = noise_shape(x.sizes(), count);
    const auto conv_format =
        g.channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
    if (noise_x.has_value()) {
      eps_conv = noise_x->narrow(0, start, count).flatten(0, 1).contiguous(conv_format);
      if (a.draws_eta) {
        for (const auto i : c10::irange(count)) eta[i] = (*noise_y)[start + i];
      }
    } else {
      // normal_(0, sigma) draws the numbers of at::randn and scales them, in one pass: the
      // same noise as randn(...) * sigma, drawn per iteration to keep the same stream, in
      // NCHW order (a draw into a channels-last slice would fill it in memory order) and
      // copied into the chunk's layout. bfloat16/float16: drawn in float32 and rounded as it is
      // copied, so a seed gives the same noise as in a float32 run (normal_ on a low-precision
      // tensor draws another stream), without a float32 copy of the whole chunk.
      const auto draw_options =
          x.options().dtype(is_reduced_float(x) ? at::kFloat : x.scalar_type());
      const bool draw_in_place = !is_reduced_float(x) && !g.channels_last;
      std::vector<int64_t> sizes{count * batch};
      sizes.insert(sizes.end(), x.sizes().begin() + 1, x.sizes().end());
      eps_conv = allocate(a.op, "chunk_iterations", sizes, x.options().memory_format(conv_format));
      const auto eps_draws = eps_conv.view(chunk_sizes);
      for (const auto i : c10::irange(count)) {
        if (draw_in_place) {
          eps_draws[i].normal_(0.0, a.noise_std);
        } else {
          // Rounded first, then laid out: reordering 2-byte elements is faster than a copy
          // that also converts (benchmarks/RESULTS.md, Kernel choices).
          eps_draws[i].copy_(
              at::empty(x.sizes(), draw_options).normal_(0.0, a.noise_std).to(x.scalar_type()));
        }
        if (a.draws_eta) {
          eta[i] =
              at::empty(output_sizes, draw_options).normal_(0.0, a.noise_std).to(x.scalar_type());
        }
      }
    }
    // F(x + eps) does not depend on the feedback weights: one batched pass per chunk, on
    // x + eps formed in the convolutions' layout.
    auto noisy_input = at::empty_like(eps_conv);
    auto noisy_view = noisy_input.view(chunk_sizes);
    at::add_out(noisy_view, eps_conv.view(chunk_sizes), x_conv);
    const auto eps_split = eps_conv.split(batch);
    const auto noisy_inputs = noisy_input.split(batch);
    const auto noisy_preactivations =
        preactivation(g, noisy_input, weight, bias, unrolled_weight).split(batch);
    for (const auto i : c10::irange(count)) {
      chunk_losses[i] = iteration(eps_split[i], noisy_inputs[i], noisy_preactivations[i], eta[i]);
      interrupts.poll();
    }
    losses.narrow(0, start, count).copy_(at::stack(chunk_losses));
  }
  return losses.div_(static_cast<double>(batch));  // the iterations return B * loss
}

// The loops update their state in place with flat passes over dense tensors. A state tensor in
// another layout (a channels-last model's feedback weight) is updated through a contiguous copy
// that is written back at the end.
struct LoopState {
  at::Tensor* targets[4];
  at::Tensor weight, bias, momentum_weight, momentum_bias;
  LoopState(at::Tensor& w, at::Tensor& b, at::Tensor& mw, at::Tensor& mb)
      : targets{&w, &b, &mw, &mb},
        weight(w.contiguous()),
        bias(b.contiguous()),
        momentum_weight(mw.contiguous()),
        momentum_bias(mb.contiguous()) {}
  // Float32 masters (whose products read a per-iteration cast of V anyway) move to the layout
  // the pairings come out in (channels-last from the im2col route and channels-last convs), so
  // the SGD pass reads the pairings without a reordering copy each.
  void follow(const at::Tensor& pairing) {
    const auto format = dense_format(pairing);
    if (weight.is_contiguous(format) && momentum_weight.strides() == weight.strides()) return;
    weight = weight.contiguous(format);
    momentum_weight = momentum_weight.contiguous(format);
  }
  void write_back() {
    const at::Tensor* work[4] = {&weight, &bias, &momentum_weight, &momentum_bias};
    for (int i = 0; i < 4; ++i) {
      if (!work[i]->is_same(*targets[i])) targets[i]->copy_(*work[i]);
    }
  }
};

// `iterations` steps of torch.optim.SGD (momentum, no dampening, no Nesterov) with a zero
// gradient, in closed form: the step is linear in (buffer, param),
//   [buffer, param] <- M [buffer, param],  M = [[momentum, wd], [-lr momentum, 1 - lr wd]],
// so K steps are M^K (a 2x2 power on the host) applied once. L-DRL's feedback bias has a zero
// gradient at every iteration (both loss terms are differences of G).
void sgd_momentum_decay(at::Tensor& param, at::Tensor& buffer, int64_t iterations, double lr,
                        double momentum, double weight_decay) {
  if (iterations == 0) return;
  double m[4] = {1, 0, 0, 1};  // M^K, row-major
  const double step[4] = {momentum, weight_decay, -lr * momentum, 1 - lr * weight_decay};
  for (int64_t k = 0; k < iterations; ++k) {
    const double r[4] = {step[0] * m[0] + step[1] * m[2], step[0] * m[1] + step[1] * m[3],
                         step[2] * m[0] + step[3] * m[2], step[2] * m[1] + step[3] * m[3]};
    std::copy(r, r + 4, m);
  }
  const auto old_buffer = buffer.clone();
  buffer.mul_(m[0]).add_(param, m[1]);
  param.mul_(m[3]).add_(old_buffer, m[2]);
}

// docs/maths.md §4 for one block: `iterations` steps of fresh noise, loss, SGD-momentum update of
// the feedback weight and bias (updated in place with their momentum buffers). Returns the loss of
// every iteration. Noise comes from torch's default generator, or from noise_x / noise_y
// (shapes [iterations, *x.shape] and [iterations, *output.shape]) when given.
at::Tensor ldrl_feedback_loop(const at::Tensor& x, const at::Tensor& weight,
                              const c10::optional<at::Tensor>& bias, at::Tensor& feedback_weight,
                              at::Tensor& feedback_bias, at::Tensor& momentum_weight,
                              at::Tensor& momentum_bias, int64_t iterations, double noise_std,
                              double lr, double momentum, double weight_decay,
                              int64_t chunk_iterations, const c10::optional<at::Tensor>& noise_x,
                              const c10::optional<at::Tensor>& noise_y, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                              c10::string_view activation, int64_t pool) {
  constexpr const char* op = "dtp_ext.ldrl_feedback_loop";
  FeedbackLoopArgs args{
      .op = op,
      .g = start_op(op, x.device(), weight, stride, padding, dilation, groups, activation, pool),
      .x = x,
      .weight = weight,
      .bias = bias,
      .feedback_weight = feedback_weight,
      .feedback_bias = feedback_bias,
      .momentum_weight = momentum_weight,
      .momentum_bias = momentum_bias,
      .iterations = iterations,
      .noise_std = noise_std,
      .lr = lr,
      .momentum = momentum,
      .weight_decay = weight_decay,
      .chunk_iterations = chunk_iterations,
      .noise_x = noise_x,
      .noise_y = noise_y,
      .draws_eta = true};
  check_feedback_loop(args);
  // The clean and the noisy passes take the same route (the unrolled GEMM where it applies).
  const auto unrolled = unrolled_conv_weight(args.g, x.sizes(), weight);
  const auto clean = clean_pass(args.g, x.contiguous(), weight, bias, unrolled);
  const double grad_scale = 2.0 / static_cast<double>(x.size(0));
  LoopState state(feedback_weight, feedback_bias, momentum_weight, momentum_bias);
  // Float32 masters (x bfloat16/float16, V float32): each iteration's products use V cast to
  // x's dtype; the fused SGD pass reads the pairings into float32 and updates the float32 V and
  // momentum, so many small steps are not lost to bfloat16's rounding of V.
  const bool master = state.weight.scalar_type() != x.scalar_type();
  auto losses = run_feedback_loop(
      args, unrolled,
      [&](const at::Tensor& eps, const at::Tensor&, const at::Tensor& z_noisy,
          const at::Tensor& eta) {
        // One copy casts V, in the convolutions' layout or, for NCHW convolutions, the
        // master's (a channels-last weight there costs the small maps' products nothing; a
        // reordering cast did, per iteration).
        const auto v = master ? at::empty(state.weight.sizes(),
                                          x.options().memory_format(
                                              args.g.channels_last ? at::MemoryFormat::ChannelsLast
                                                                   : dense_format(state.weight)))
                                    .copy_(state.weight)
                              : state.weight;
        auto terms = ldrl_terms(args.g, clean, x.sizes(), v, eps, z_noisy, eta);
        if (master) state.follow(terms.reconstruction_pairing);
        // The update returns B times the loss, <V, H> - 2 <V, E>, for the V of this iteration
        // (the float32 master).
        return sgd_momentum_update(state.weight, state.momentum_weight,
                                   terms.reconstruction_pairing, terms.noise_pairing, grad_scale,
                                   weight_decay, momentum, lr);
      });
  // dloss/dc is exactly zero: only momentum and weight decay move the feedback bias.
  sgd_momentum_decay(state.bias, state.momentum_bias, iterations, lr, momentum, weight_decay);
  state.write_back();
  return losses;
}

// Vanilla DTP's feedback training (docs/maths.md §10, Lee et al.): `iterations` SGD-momentum steps
// on mean_b sum ((x + eps) - G(F(x + eps)))^2, G unpooling with the noisy pass's indices. Noise
// eps_k from torch's default generator, or noise_x ([iterations, *x.shape]) when given.
at::Tensor reconstruction_feedback_loop(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    at::Tensor& feedback_weight, at::Tensor& feedback_bias, at::Tensor& momentum_weight,
    at::Tensor& momentum_bias, int64_t iterations, double noise_std, double lr, double momentum,
    double weight_decay, int64_t chunk_iterations, const c10::optional<at::Tensor>& noise_x,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    c10::string_view activation, int64_t pool) {
  constexpr const char* op = "dtp_ext.reconstruction_feedback_loop";
  const c10::optional<at::Tensor> no_noise_y;
  FeedbackLoopArgs args{
      .op = op,
      .g = start_op(op, x.device(), weight, stride, padding, dilation, groups, activation, pool),
      .x = x,
      .weight = weight,
      .bias = bias,
      .feedback_weight = feedback_weight,
      .feedback_bias = feedback_bias,
      .momentum_weight = momentum_weight,
      .momentum_bias = momentum_bias,
      .iterations = iterations,
      .noise_std = noise_std,
      .lr = lr,
      .momentum = momentum,
      .weight_decay = weight_decay,
      .chunk_iterations = chunk_iterations,
      .noise_x = noise_x,
      .noise_y = no_noise_y,
      .draws_eta = false};
  check_feedback_loop(args);
  const double grad_scale = 2.0 / static_cast<double>(x.size(0));
  LoopState state(feedback_weight, feedback_bias, momentum_weight, momentum_bias);
  const bool master = state.weight.scalar_type() != x.scalar_type();  // float32 masters
  auto losses = run_feedback_loop(
      args, unrolled_conv_weight(args.g, x.sizes(), weight),
      [&](const at::Tensor&, const at::Tensor& x_noisy, const at::Tensor& z_noisy,
          const at::Tensor&) {
        const auto& g = args.g;
        const auto v = master ? state.weight.to(x.scalar_type()) : state.weight;
        const auto c = master ? state.bias.to(x.scalar_type()) : state.bias;
        // q = phi(unpool(F(x + eps))) with the noisy pass's indices; r = V q + c.
        const auto q = noisy_difference(z_noisy, at::Tensor(), at::Tensor(), g.activation, g.pool,
                                        g.channels_last);
        const auto fq = apply_feedback(g, q, v, x.sizes());
        const auto residual = g.is_conv ? fq + c.view({1, -1, 1, 1}) - x_noisy : fq + c - x_noisy;
        // loss = mean_b sum (r - (x + eps))^2; dV = 2/B pairing(e, q); dc = 2/B sum_b,space e.
        // The fused SGD pass scales the pairings by 2/B; the loss is returned times B.
        sgd_momentum_update(state.weight, state.momentum_weight,
                            feedback_pairing(g, residual, q, v), at::Tensor(), grad_scale,
                            weight_decay, momentum, lr);
        // The bias gradient accumulates in float32 for bfloat16/float16 (a float16 partial sum
        // overflows at 65504, and the float32 master would take its inf), in the master's dtype.
        const auto acc = is_reduced_float(residual) ? at::kFloat : residual.scalar_type();
        const auto bias_grad =
            (g.is_conv ? residual.sum({0, 2, 3}, false, acc) : residual.sum(0, false, acc))
                .to(state.bias.scalar_type());
        sgd_momentum_update(state.bias, state.momentum_bias, bias_grad, at::Tensor(), grad_scale,
                            weight_decay, momentum, lr);
        const auto r = to_opmath(flat(residual));  // the loss: a float32 reduction
        return at::dot(r, r);
      });
  state.write_back();
  return losses;
}

// A block without activation and pool needs no stored output: its feedback difference is
// linear in delta. Otherwise the output and (with a pool) the clean indices are required.
void check_stored_output(const char* op, const BlockGeometry& g, const at::Tensor& output,
                         const at::Tensor& indices, const at::Tensor& delta,
                         at::IntArrayRef expected) {
  check_shape(op, "delta", delta, expected);
  TORCH_CHECK(output.defined() || (g.activation == Activation::Identity && g.pool == 0), op,
              ": output is required for a block with an activation or a pool");
  if (output.defined()) {
    check_same_device_dtype(op, "output", output, delta);
    check_shape(op, "output", output, expected);
  }
  TORCH_CHECK(indices.defined() == (g.pool > 0), op,
              ": indices must be given exactly when pool > 1");
  if (indices.defined()) {
    TORCH_CHECK(indices.scalar_type() == at::kLong && indices.device() == delta.device(), op,
                ": indices must be int64 on ", delta.device(), ", got ", indices.scalar_type(),
                " on ", indices.device());
    check_shape(op, "indices", indices, expected);
  }
}

// docs/maths.md §3: delta_in = (G(s) - G(s - scale * delta)) / scale with scale = beta * B.
at::Tensor propagate_target(const c10::optional<at::Tensor>& output_opt,
                            const c10::optional<at::Tensor>& indices, const at::Tensor& delta,
                            const at::Tensor& feedback_weight, double scale,
                            at::IntArrayRef input_sizes, at::IntArrayRef stride,
                            at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                            c10::string_view activation, int64_t pool,
                            const c10::optional<at::Tensor>& loss_scale) {
  constexpr const char* op = "dtp_ext.propagate_target";
  auto g = start_op(op, delta.device(), feedback_weight, stride, padding, dilation, groups,
                    activation, pool);
  TORCH_CHECK(is_supported_float(delta.scalar_type()), op,
              ": delta must be float32, float64, bfloat16 or float16, got ", delta.scalar_type());
  TORCH_CHECK(scale > 0 && std::isfinite(scale), op,
              ": scale (beta * batch) must be finite and > 0, got ", scale);
  if (loss_scale.has_value()) {
    // The loss's scale k as a tensor read when the op runs (a compiled backward's): the step
    // on a k-scaled delta is scale / k, so the result is k times the unscaled one without
    // dividing delta (which would push a float16 delta back into its underflow).
    const auto& k = *loss_scale;
    TORCH_CHECK(k.dim() == 0 && k.device().is_cpu() && k.scalar_type() == at::kDouble, op,
                ": loss_scale must be a 0-d float64 CPU tensor, got ", k.scalar_type(), " ",
                k.sizes(), " on ", k.device());
    const double value = k.item<double>();
    TORCH_CHECK(value > 0 && std::isfinite(value), op, ": loss_scale must be finite and > 0, got ",
                value);
    scale /= value;
    TORCH_CHECK(scale > 0 && std::isfinite(scale), op,
                ": scale / loss_scale must be finite and > 0, got ", scale);
  }
  TORCH_CHECK(input_sizes.size() == static_cast<size_t>(g.is_conv ? 4 : 2), op,
              ": input_sizes must have ", g.is_conv ? 4 : 2, " entries, got ", input_sizes);
  check_same_device_dtype(op, "feedback_weight", feedback_weight, delta);
  // The forward weight's shape, which the geometry helpers expect (V is W^T for linear).
  const auto forward_shaped = g.is_conv ? feedback_weight : feedback_weight.t();
  const int64_t in_channels = forward_shaped.size(1) * (g.is_conv ? g.groups : 1);
  TORCH_CHECK(input_sizes[0] > 0 && input_sizes[1] == in_channels, op,
              ": input_sizes must describe a non-empty input with ", in_channels,
              g.is_conv ? " channels" : " features", " (what feedback_weight maps to), got ",
              input_sizes);
  const auto output = optional_or_undefined(output_opt);
  const auto idx = optional_or_undefined(indices);
  check_map_sizes(op, g, input_sizes, forward_shaped);
  check_stored_output(op, g, output, idx, delta,
                      block_output_sizes(g, input_sizes, forward_shaped));
  check_finite(op, {{"output", &output}, {"delta", &delta}, {"feedback_weight", &feedback_weight}});
  use_channels_last(g, input_sizes, delta.device());
  // Outputs are contiguous whatever layout the products ran in (what the fake kernel says).
  if (!output.defined()) return apply_feedback(g, delta, feedback_weight, input_sizes).contiguous();
  // (phi(s) - phi(s - scale*delta)) / scale, unpooled with the clean forward indices.
  const auto u = phi_unpool_difference(op, output, delta, -scale, idx,
                                       activate(g.activation, to_opmath(output)), idx,
                                       pre_pool_sizes(g, input_sizes, forward_shaped), g.pool,
                                       g.activation, -1.0 / scale, g.channels_last);
  return apply_feedback(g, u, feedback_weight, input_sizes).contiguous();
}

// The block's own weight gradients: the local vector-Jacobian product of delta through
// pool(phi(op(x))), using the stored output and pool indices instead of the pre-activation.
std::tuple<at::Tensor, at::Tensor> block_weight_grad(
    const at::Tensor& x, const c10::optional<at::Tensor>& output_opt,
    const c10::optional<at::Tensor>& indices, const at::Tensor& delta, const at::Tensor& weight,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    c10::string_view activation, int64_t pool) {
  constexpr const char* op = "dtp_ext.block_weight_grad";
  auto g = start_op(op, x.device(), weight, stride, padding, dilation, groups, activation, pool);
  check_block_tensors(op, g, x, weight, c10::nullopt);
  check_same_device_dtype(op, "delta", delta, x);
  const auto output = optional_or_undefined(output_opt);
  const auto idx = optional_or_undefined(indices);
  check_stored_output(op, g, output, idx, delta, block_output_sizes(g, x.sizes(), weight));
  check_finite(op, {{"x", &x}, {"output", &output}, {"delta", &delta}, {"weight", &weight}});
  use_channels_last(g, x.sizes(), x.device());
  const auto grad_pre =
      output.defined()
          ? activation_pool_backward(op, output, idx, delta, pre_pool_sizes(g, x.sizes(), weight),
                                     g.pool, g.activation)
          : delta;
  if (!g.is_conv) {
    // The bias gradient is a reduction: float32 for bfloat16/float16, returned in their dtype.
    return {at::mm(grad_pre.t(), x), to_opmath(grad_pre).sum(0).to(weight.scalar_type())};
  }
  // bfloat16/float16 on the CPU: the weight-gradient reduction in float32 on float32 copies
  // (faster there than oneDNN's low-precision weight-gradient kernel; see feedback_pairing),
  // returned in the weight's dtype.
  const bool upcast = is_reduced_float(x) && x.device().is_cpu();
  auto grads = at::convolution_backward(
      upcast ? grad_pre.to(at::kFloat) : grad_pre, upcast ? x.to(at::kFloat) : x,
      upcast ? weight.to(at::kFloat) : weight, c10::nullopt, g.stride, g.padding, g.dilation, false,
      {0, 0}, g.groups, {false, true, true});
  return {std::get<1>(grads).to(weight.scalar_type()).contiguous(),
          std::get<2>(grads).to(weight.scalar_type()).contiguous()};
}

void register_ops(torch::Library& m) {
  m.impl("ldrl_loss", &ldrl_loss);
  m.impl("ldrl_feedback_loop", &ldrl_feedback_loop);
  m.impl("reconstruction_feedback_loop", &reconstruction_feedback_loop);
  m.impl("propagate_target", &propagate_target);
  m.impl("block_weight_grad", &block_weight_grad);
}

}  // namespace
}  // namespace dtp_ext

// One algorithm for every device: the dispatcher picks this kernel for CPU (and CUDA) tensors,
// and the private elementwise ops it calls run that device's kernels.
TORCH_LIBRARY_IMPL(dtp_ext, CPU, m) { dtp_ext::register_ops(m); }
#ifdef DTP_WITH_CUDA
TORCH_LIBRARY_IMPL(dtp_ext, CUDA, m) { dtp_ext::register_ops(m); }
#endif
