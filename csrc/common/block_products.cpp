#include "block_products.h"

#include <c10/util/irange.h>

#include <array>

namespace dtp_ext {

// Output maps with at most this many positions take the im2col + GEMM weight-gradient path
// (bfloat16 on a CPU with native bfloat16 products: up to 16, where the GEMM beats oneDNN's
// weight-gradient kernel on both AMX and AVX512-BF16 CPUs; benchmarks/RESULTS.md, Kernel
// choices).
constexpr int64_t kSmallMapPositions = 4;
constexpr int64_t kSmallMapPositionsNativeBf16 = 16;

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

at::Tensor unrolled_conv_weight(const BlockGeometry& g, at::IntArrayRef input_sizes,
                                const at::Tensor& weight) {
  if (!g.is_conv || g.groups != 1 || input_sizes.size() != 4) return at::Tensor();
  int64_t out[2], in[2], kernel[2];
  for (const auto d : c10::irange(2)) {
    in[d] = input_sizes[2 + d];
    kernel[d] = weight.size(2 + d);
    out[d] = in[d] + 2 * g.padding[d] - kernel[d] + 1;
    // Stride and dilation 1, and input + padding within the kernel: then every output position
    // reads every input position (tap = input - output + padding lies inside the kernel), so
    // the unrolled matrix holds no structural zeros and its product does only the conv's work.
    if (g.stride[d] != 1 || g.dilation[d] != 1 || in[d] + g.padding[d] > kernel[d] || out[d] < 1)
      return at::Tensor();
  }
  std::vector<int64_t> taps;
  taps.reserve(out[0] * out[1] * in[0] * in[1]);
  for (const auto oh : c10::irange(out[0]))
    for (const auto ow : c10::irange(out[1]))
      for (const auto ih : c10::irange(in[0]))
        for (const auto iw : c10::irange(in[1]))
          taps.push_back((ih - oh + g.padding[0]) * kernel[1] + (iw - ow + g.padding[1]));
  const auto index = at::tensor(taps, at::kLong).to(weight.device());
  const int64_t cout = weight.size(0), cin = weight.size(1);
  return weight.reshape({cout, cin, kernel[0] * kernel[1]})
      .index_select(2, index)
      .view({cout, cin, out[0] * out[1], in[0] * in[1]})
      .permute({0, 2, 1, 3})
      .reshape({cout * out[0] * out[1], cin * in[0] * in[1]});
}

at::Tensor preactivation(const BlockGeometry& g, const at::Tensor& x, const at::Tensor& weight,
                         const c10::optional<at::Tensor>& bias, const at::Tensor& unrolled) {
  if (unrolled.defined()) {
    auto sizes = pre_pool_sizes(g, x.sizes(), weight);
    const auto rows = x.reshape({x.size(0), -1});
    const int64_t positions = sizes[2] * sizes[3];
    const auto z =
        bias.has_value() && bias->defined()
            ? at::addmm(bias->view({-1, 1}).expand({weight.size(0), positions}).reshape(-1), rows,
                        unrolled.t())
            : at::mm(rows, unrolled.t());
    return z.view(sizes);
  }
  return g.is_conv ? at::convolution(conv_layout(g, x), conv_layout(g, weight), bias, g.stride,
                                     g.padding, g.dilation, /*transposed=*/false, {0, 0}, g.groups)
                   : at::linear(x, weight, bias);
}

BlockOutput forward_block(const BlockGeometry& g, const at::Tensor& x, const at::Tensor& weight,
                          const c10::optional<at::Tensor>& bias, const at::Tensor& unrolled) {
  at::Tensor h = activate(g.activation, preactivation(g, x, weight, bias, unrolled));
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

// Whether this CPU computes bfloat16 dot products natively (AVX512-BF16 or AMX-BF16), where
// oneDNN's bfloat16 weight-gradient convolution beats the float32 one (see feedback_pairing);
// elsewhere oneDNN emulates bfloat16 and float32 is faster. Only a speed choice: both routes
// are correct.
static bool cpu_has_native_bf16() {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("amx-bf16") != 0 || __builtin_cpu_supports("avx512bf16") != 0;
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
  const bool native_bf16 =
      p.device().is_cpu() && all_bfloat16(p, q, feedback_weight) && cpu_has_native_bf16();
  return g.groups == 1 &&
         q.size(2) * q.size(3) <= (native_bf16 ? kSmallMapPositionsNativeBf16 : kSmallMapPositions);
}

bool pairs_in_float32(const BlockGeometry& g, const at::Tensor& p, const at::Tensor& q,
                      const at::Tensor& feedback_weight) {
  return g.is_conv && p.device().is_cpu() &&
         (is_reduced_float(p) || is_reduced_float(q) || is_reduced_float(feedback_weight)) &&
         !small_map_pairing(g, p, q, feedback_weight) &&
         !(all_bfloat16(p, q, feedback_weight) && cpu_has_native_bf16());
}

at::Tensor feedback_pairing(const BlockGeometry& g, const at::Tensor& p, const at::Tensor& q,
                            const at::Tensor& feedback_weight) {
  if (!g.is_conv) return at::mm(p.t(), q);
  if (small_map_pairing(g, p, q, feedback_weight)) {
    // Tiny output maps (deep blocks): an explicit im2col and one GEMM beat the library's
    // weight-gradient kernel, whose per-call cost dominates at a few positions. The columns are
    // built channels-last: rows of the padded NHWC input are whole channel vectors, so one
    // strided view of it is the column matrix [B*L, kH*kW*Cin] and one copy of contiguous
    // rows makes it (ATen's NCHW im2col, then tensordot's transposing copy, took markedly
    // longer: benchmarks/RESULTS.md, Kernel choices).
    const int64_t batch = p.size(0), cin = p.size(1), cout = q.size(1);
    const int64_t kh = feedback_weight.size(2), kw = feedback_weight.size(3);
    auto padded = at::zeros(
        {batch, p.size(2) + 2 * g.padding[0], p.size(3) + 2 * g.padding[1], cin}, p.options());
    padded.narrow(1, g.padding[0], p.size(2))
        .narrow(2, g.padding[1], p.size(3))
        .copy_(p.permute({0, 2, 3, 1}));
    const auto s = padded.strides();
    const auto cols = padded
                          .as_strided({batch, q.size(2), q.size(3), kh, kw, cin},
                                      {s[0], s[1] * g.stride[0], s[2] * g.stride[1],
                                       s[1] * g.dilation[0], s[2] * g.dilation[1], s[3]})
                          .reshape({-1, kh * kw * cin});
    const auto q_rows = q.permute({1, 0, 2, 3}).reshape({cout, -1});  // [Cout, B*L]
    return at::mm(q_rows, cols).view({cout, kh, kw, cin}).permute({0, 3, 1, 2});
  }
  if (pairs_in_float32(g, p, q, feedback_weight)) {
    // Mixed precision on a CPU without native bfloat16 products (float16 anywhere on the CPU):
    // the conv's weight-gradient pairing runs in float32 on float32 copies of its low-precision
    // operands (oneDNN's emulated bfloat16 weight-gradient kernel was slower than float32's,
    // casts included). With AVX512-BF16 or AMX-BF16 (pairs_in_float32 false) the bfloat16
    // kernel, which accumulates in float32 and rounds its output once, is faster, as the GEMM
    // pairings (linear blocks, the small-map im2col path) are (benchmarks/RESULTS.md, Kernel
    // choices); the SGD pass reads every pairing into float32. On CUDA every pairing runs in
    // the low dtype (cuBLAS/cuDNN accumulate in float32).
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
  return std::get<1>(grads);
}

}  // namespace dtp_ext
