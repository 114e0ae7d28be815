#include "block_products.h"

#include <c10/util/irange.h>

#include <array>

namespace dtp_ext {

// Output maps with at most this many positions take the im2col + GEMM weight-gradient path
// (bfloat16 on AMX: up to 16, where the GEMM beats oneDNN's weight-gradient kernel; measured
// on SimpleVGG's 4x4 block, 2.0x faster than float32 instead of 1.3x).
constexpr int64_t kSmallMapPositions = 4;
constexpr int64_t kSmallMapPositionsAmxBf16 = 16;

namespace {
std::array<ChannelsLastRule, static_cast<size_t>(c10::DeviceType::COMPILE_TIME_MAX_DEVICE_TYPES)>&
channels_last_rules() {
  static std::array<ChannelsLastRule,
                    static_cast<size_t>(c10::DeviceType::COMPILE_TIME_MAX_DEVICE_TYPES)>
      rules{};
  return rules;
}
}  // namespace

bool register_channels_last_rule(c10::DeviceType device, ChannelsLastRule rule) {
  channels_last_rules()[static_cast<size_t>(device)] = rule;
  return true;
}

void use_channels_last(BlockGeometry& g, at::IntArrayRef input_sizes, const at::Device& device) {
  const auto rule = channels_last_rules()[static_cast<size_t>(device.type())];
  if (!g.is_conv || rule == nullptr || input_sizes.size() != 4) return;
  const int64_t positions = (input_sizes[2] + 2 * g.padding[0]) / g.stride[0] *
                            ((input_sizes[3] + 2 * g.padding[1]) / g.stride[1]);
  g.channels_last = rule(positions);
}

at::Tensor conv_layout(const BlockGeometry& g, const at::Tensor& t) {
  return g.channels_last ? t.contiguous(at::MemoryFormat::ChannelsLast) : t;
}

at::Tensor activate(Activation a, const at::Tensor& z) {
  switch (a) {
    case Activation::ReLU: return at::relu(z);
    case Activation::ELU: return at::elu(z);
    case Activation::Tanh: return at::tanh(z);
    default: return z;
  }
}

at::Tensor preactivation(const BlockGeometry& g, const at::Tensor& x, const at::Tensor& weight,
                         const c10::optional<at::Tensor>& bias) {
  return g.is_conv ? at::convolution(conv_layout(g, x), conv_layout(g, weight), bias, g.stride,
                                     g.padding, g.dilation, /*transposed=*/false, {0, 0}, g.groups)
                   : at::linear(x, weight, bias);
}

BlockOutput forward_block(const BlockGeometry& g, const at::Tensor& x, const at::Tensor& weight,
                          const c10::optional<at::Tensor>& bias) {
  at::Tensor h = activate(g.activation, preactivation(g, x, weight, bias));
  BlockOutput out;
  out.pre_pool_sizes = h.sizes().vec();
  if (g.pool > 0) {
    auto pooled = at::max_pool2d_with_indices(h, {g.pool, g.pool}, {g.pool, g.pool});
    out.output = std::get<0>(pooled);
    out.indices = std::get<1>(pooled);
  } else {
    out.output = h;
  }
  return out;
}

at::Tensor apply_feedback(const BlockGeometry& g, const at::Tensor& u,
                          const at::Tensor& feedback_weight, at::IntArrayRef input_sizes) {
  if (!g.is_conv) return at::mm(u, feedback_weight.t());
  // The exact adjoint of the conv: a transposed conv whose output padding restores the input
  // size that the conv's floor division dropped.
  std::vector<int64_t> output_padding(2);
  for (const auto d : c10::irange(2)) {
    const int64_t k = feedback_weight.size(2 + d);
    const int64_t reached =
        (u.size(2 + d) - 1) * g.stride[d] - 2 * g.padding[d] + g.dilation[d] * (k - 1) + 1;
    output_padding[d] = input_sizes[2 + d] - reached;
  }
  return at::convolution(conv_layout(g, u), conv_layout(g, feedback_weight), c10::nullopt, g.stride,
                         g.padding, g.dilation, /*transposed=*/true, output_padding, g.groups);
}

// Whether this CPU has AMX-BF16 tiles, where oneDNN's bfloat16 weight-gradient convolution
// beats the float32 one (see feedback_pairing). Only a speed choice: both routes are correct.
static bool cpu_has_amx_bf16() {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("amx-bf16") != 0;
  }();
  return has;
#else
  return false;
#endif
}

static bool all_bfloat16(const at::Tensor& p, const at::Tensor& q, const at::Tensor& w) {
  return p.scalar_type() == at::kBFloat16 && q.scalar_type() == at::kBFloat16 &&
         w.scalar_type() == at::kBFloat16;
}

// Whether the weight-gradient pairing of p and q takes the im2col + GEMM path.
static bool small_map_pairing(const BlockGeometry& g, const at::Tensor& p, const at::Tensor& q,
                              const at::Tensor& feedback_weight) {
  const bool amx_bf16 =
      p.device().is_cpu() && all_bfloat16(p, q, feedback_weight) && cpu_has_amx_bf16();
  return g.groups == 1 &&
         q.size(2) * q.size(3) <= (amx_bf16 ? kSmallMapPositionsAmxBf16 : kSmallMapPositions);
}

bool pairs_in_float32(const BlockGeometry& g, const at::Tensor& p, const at::Tensor& q,
                      const at::Tensor& feedback_weight) {
  return g.is_conv && p.device().is_cpu() &&
         (is_reduced_float(p) || is_reduced_float(q) || is_reduced_float(feedback_weight)) &&
         !small_map_pairing(g, p, q, feedback_weight) &&
         !(all_bfloat16(p, q, feedback_weight) && cpu_has_amx_bf16());
}

at::Tensor feedback_pairing(const BlockGeometry& g, const at::Tensor& p, const at::Tensor& q,
                            const at::Tensor& feedback_weight) {
  if (!g.is_conv) return at::mm(p.t(), q);
  if (small_map_pairing(g, p, q, feedback_weight)) {
    // Tiny output maps (deep blocks): an explicit im2col and one GEMM beat the library's
    // weight-gradient kernel, whose per-call cost dominates at a few positions.
    const auto cols = at::im2col(p, {feedback_weight.size(2), feedback_weight.size(3)}, g.dilation,
                                 g.padding, g.stride);          // (B, Cin*kH*kW, L)
    const auto q_flat = q.reshape({q.size(0), q.size(1), -1});  // (B, Cout, L)
    return at::tensordot(q_flat, cols, {0, 2}, {0, 2}).view(feedback_weight.sizes());
  }
  if (pairs_in_float32(g, p, q, feedback_weight)) {
    // Mixed precision on the CPU without AMX-BF16: the conv's weight-gradient pairing runs in
    // float32 on float32 copies of its bfloat16/float16 operands (that machine's oneDNN
    // bfloat16 weight-gradient kernel was slower than float32's: 77 and 113 ms vs 72 and 75 ms,
    // casts included, SimpleVGG's 128ch 16x16 and 256ch 8x8 layers at batch 32). With AMX-BF16
    // (pairs_in_float32 false) the bfloat16 kernel, which accumulates in float32 and rounds its
    // output once, is 2.3-4.7x faster (1.6 vs 7.3 ms and 1.4 vs 3.2 ms per call on a Xeon with
    // AMX, torch 2.14.1), as the GEMM pairings (linear blocks, the small-map im2col path) are;
    // the SGD pass reads every pairing into float32. On CUDA every pairing runs in the low
    // dtype (cuBLAS/cuDNN accumulate in float32).
    // The weight gradient reads only the weight's shape (and layout): an uninitialised float32
    // tensor in the convolutions' layout stands in for it, without a copy.
    const auto stand_in =
        at::empty(feedback_weight.sizes(),
                  p.options()
                      .dtype(at::kFloat)
                      .memory_format(g.channels_last ? at::MemoryFormat::ChannelsLast
                                                     : at::MemoryFormat::Contiguous));
    return feedback_pairing(g, p.to(at::kFloat), q.to(at::kFloat), stand_in);
  }
  auto grads = at::convolution_backward(
      conv_layout(g, q), conv_layout(g, p), conv_layout(g, feedback_weight), c10::nullopt, g.stride,
      g.padding, g.dilation, /*transposed=*/false, {0, 0}, g.groups, {false, true, false});
  return std::get<1>(grads).contiguous();
}

}  // namespace dtp_ext
