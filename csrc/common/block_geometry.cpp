#include "block_geometry.h"

#include <c10/util/irange.h>

namespace dtp_ext {

// Output maps with at most this many positions take the im2col + GEMM weight-gradient path
// (bfloat16 on AMX: up to 16, where the GEMM beats oneDNN's weight-gradient kernel; measured
// on SimpleVGG's 4x4 block, 2.0x faster than float32 instead of 1.3x).
constexpr int64_t kSmallMapPositions = 4;
constexpr int64_t kSmallMapPositionsAmxBf16 = 16;
// Output maps with at least this many positions run their convolutions channels-last (CPU).
constexpr int64_t kChannelsLastMinPositions = 128;

void use_channels_last(BlockGeometry& g, at::IntArrayRef input_sizes, const at::Device& device) {
  if (!g.is_conv || !device.is_cpu() || input_sizes.size() != 4) return;
  const int64_t positions = (input_sizes[2] + 2 * g.padding[0]) / g.stride[0] *
                            ((input_sizes[3] + 2 * g.padding[1]) / g.stride[1]);
  g.channels_last = positions >= kChannelsLastMinPositions;
}

at::Tensor conv_layout(const BlockGeometry& g, const at::Tensor& t) {
  return g.channels_last ? t.contiguous(at::MemoryFormat::ChannelsLast) : t;
}

Activation parse_activation(const char* op, const std::string& name) {
  if (name == "none" || name == "identity") return Activation::Identity;
  if (name == "relu") return Activation::ReLU;
  if (name == "elu") return Activation::ELU;
  if (name == "tanh") return Activation::Tanh;
  TORCH_CHECK(false, op, ": activation must be one of 'none', 'relu', 'elu', 'tanh', got '",
              name, "'");
}

static std::vector<int64_t> pair_arg(const char* op, const char* name, at::IntArrayRef v,
                                     int64_t minimum) {
  TORCH_CHECK(v.size() == 2, op, ": ", name, " must have 2 entries for a conv block, got ",
              v.size());
  for (auto e : v) {
    TORCH_CHECK(e >= minimum, op, ": ", name, " entries must be >= ", minimum, ", got ", v);
  }
  return v.vec();
}

BlockGeometry parse_geometry(const char* op, const at::Tensor& weight, at::IntArrayRef stride,
                             at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                             const std::string& activation, int64_t pool) {
  BlockGeometry g;
  TORCH_CHECK(weight.dim() == 2 || weight.dim() == 4, op,
              ": weight must be 2-D (linear, out x in) or 4-D (conv, Cout x Cin/groups x kH x kW), got ",
              weight.dim(), "-D");
  g.is_conv = weight.dim() == 4;
  g.activation = parse_activation(op, activation);
  TORCH_CHECK(pool >= 0, op, ": pool must be 0 (none) or a kernel size >= 1, got ", pool);
  g.pool = pool <= 1 ? 0 : pool;
  if (g.is_conv) {
    g.stride = pair_arg(op, "stride", stride, 1);
    g.padding = pair_arg(op, "padding", padding, 0);
    g.dilation = pair_arg(op, "dilation", dilation, 1);
    TORCH_CHECK(groups >= 1 && weight.size(0) % groups == 0, op,
                ": groups must be >= 1 and divide the output channels (", weight.size(0),
                "), got ", groups);
    g.groups = groups;
  } else {
    TORCH_CHECK(g.pool == 0, op, ": pool is only defined for conv blocks, got pool=", pool);
  }
  return g;
}

void check_same_device_dtype(const char* op, const char* name, const at::Tensor& t,
                             const at::Tensor& like) {
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " must be on ", like.device(),
              " like x, got ", t.device());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", name, " must have dtype ",
              like.scalar_type(), " like x, got ", t.scalar_type());
}

void check_feedback_weight(const char* op, const BlockGeometry& g, const at::Tensor& weight,
                           const at::Tensor& feedback_weight, const at::Tensor& x,
                           bool allow_master) {
  if (allow_master && is_reduced_float(x)) {
    TORCH_CHECK(feedback_weight.device() == x.device(), op, ": feedback_weight must be on ",
                x.device(), " like x, got ", feedback_weight.device());
    TORCH_CHECK(feedback_weight.scalar_type() == x.scalar_type() ||
                    feedback_weight.scalar_type() == at::kFloat,
                op, ": feedback_weight must have dtype ", x.scalar_type(),
                " like x or Float (a float32 master copy), got ", feedback_weight.scalar_type());
  } else {
    check_same_device_dtype(op, "feedback_weight", feedback_weight, x);
  }
  const auto expected =
      g.is_conv ? weight.sizes().vec() : std::vector<int64_t>{weight.size(1), weight.size(0)};
  TORCH_CHECK(feedback_weight.sizes() == expected, op, ": feedback_weight must have shape ",
              at::IntArrayRef(expected), " for this block, got ", feedback_weight.sizes());
}

void check_block_tensors(const char* op, const BlockGeometry& g, const at::Tensor& x,
                         const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(is_supported_float(x.scalar_type()), op,
              ": x must be float32, float64, bfloat16 or float16, got ", x.scalar_type());
  check_same_device_dtype(op, "weight", weight, x);
  if (bias.has_value() && bias->defined()) {
    check_same_device_dtype(op, "bias", *bias, x);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), op,
                ": bias must have shape [", weight.size(0), "], got ", bias->sizes());
  }
  if (g.is_conv) {
    TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D (N, C, H, W) for a conv block, got ", x.dim(),
                "-D");
    TORCH_CHECK(x.size(1) == weight.size(1) * g.groups, op, ": x must have ",
                weight.size(1) * g.groups, " channels (weight.size(1) * groups), got ", x.size(1));
  } else {
    TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D (batch, in_features) for a linear block, got ",
                x.dim(), "-D");
    TORCH_CHECK(x.size(1) == weight.size(1), op, ": x must have ", weight.size(1),
                " features (weight.size(1)), got ", x.size(1));
  }
  TORCH_CHECK(x.size(0) > 0, op, ": x must hold at least one sample, got an empty batch");
  check_map_sizes(op, g, x.sizes(), weight);
}

void check_map_sizes(const char* op, const BlockGeometry& g, at::IntArrayRef input_sizes,
                     const at::Tensor& weight) {
  if (!g.is_conv) return;
  const auto pre = pre_pool_sizes(g, input_sizes, weight);
  TORCH_CHECK(pre[2] >= 1 && pre[3] >= 1, op, ": the conv's output map would be empty: input ",
              input_sizes[2], "x", input_sizes[3], " with kernel ", weight.size(2), "x",
              weight.size(3), ", padding ", at::IntArrayRef(g.padding), ", dilation ",
              at::IntArrayRef(g.dilation), " and stride ", at::IntArrayRef(g.stride));
  TORCH_CHECK(g.pool == 0 || (pre[2] >= g.pool && pre[3] >= g.pool), op,
              ": the pool (", g.pool, "x", g.pool, ") is larger than the conv's output map (",
              pre[2], "x", pre[3], ")");
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
    const int64_t reached = (u.size(2 + d) - 1) * g.stride[d] - 2 * g.padding[d] +
                            g.dilation[d] * (k - 1) + 1;
    output_padding[d] = input_sizes[2 + d] - reached;
  }
  return at::convolution(conv_layout(g, u), conv_layout(g, feedback_weight), c10::nullopt,
                         g.stride, g.padding, g.dilation, /*transposed=*/true, output_padding,
                         g.groups);
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
    const auto cols = at::im2col(p, {feedback_weight.size(2), feedback_weight.size(3)},
                                 g.dilation, g.padding, g.stride);  // (B, Cin*kH*kW, L)
    const auto q_flat = q.reshape({q.size(0), q.size(1), -1});      // (B, Cout, L)
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
    const auto stand_in = at::empty(
        feedback_weight.sizes(),
        p.options().dtype(at::kFloat).memory_format(g.channels_last
                                                        ? at::MemoryFormat::ChannelsLast
                                                        : at::MemoryFormat::Contiguous));
    return feedback_pairing(g, p.to(at::kFloat), q.to(at::kFloat), stand_in);
  }
  auto grads = at::convolution_backward(conv_layout(g, q), conv_layout(g, p),
                                        conv_layout(g, feedback_weight), c10::nullopt, g.stride,
                                        g.padding, g.dilation, /*transposed=*/false, {0, 0},
                                        g.groups, {false, true, false});
  return std::get<1>(grads).contiguous();
}


std::vector<int64_t> pre_pool_sizes(const BlockGeometry& g, at::IntArrayRef input_sizes,
                                    const at::Tensor& weight) {
  if (!g.is_conv) return {input_sizes[0], weight.size(0)};
  std::vector<int64_t> sizes{input_sizes[0], weight.size(0), 0, 0};
  for (const auto d : c10::irange(2)) {
    const int64_t k = weight.size(2 + d);
    sizes[2 + d] =
        (input_sizes[2 + d] + 2 * g.padding[d] - g.dilation[d] * (k - 1) - 1) / g.stride[d] + 1;
  }
  return sizes;
}

std::vector<int64_t> block_output_sizes(const BlockGeometry& g, at::IntArrayRef input_sizes,
                                        const at::Tensor& weight) {
  auto sizes = pre_pool_sizes(g, input_sizes, weight);
  if (g.pool > 0) {
    sizes[2] /= g.pool;
    sizes[3] /= g.pool;
  }
  return sizes;
}

}  // namespace dtp_ext
