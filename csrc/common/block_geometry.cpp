#include "block_geometry.h"

#include <c10/util/irange.h>

namespace dtp_ext {

Activation parse_activation(const char* op, const std::string& name) {
  if (name == "none" || name == "identity") return Activation::Identity;
  if (name == "relu") return Activation::ReLU;
  if (name == "elu") return Activation::ELU;
  if (name == "tanh") return Activation::Tanh;
  TORCH_CHECK(false, op, ": activation must be one of 'none', 'relu', 'elu', 'tanh', got '", name,
              "'");
}

const char* activation_name(Activation activation) {
  switch (activation) {
    case Activation::ReLU: return "relu";
    case Activation::ELU: return "elu";
    case Activation::Tanh: return "tanh";
    default: return "none";
  }
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
  TORCH_CHECK(
      weight.dim() == 2 || weight.dim() == 4, op,
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
                ": groups must be >= 1 and divide the output channels (", weight.size(0), "), got ",
                groups);
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
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), op, ": bias must have shape [",
                weight.size(0), "], got ", bias->sizes());
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
  TORCH_CHECK(g.pool == 0 || (pre[2] >= g.pool && pre[3] >= g.pool), op, ": the pool (", g.pool,
              "x", g.pool, ") is larger than the conv's output map (", pre[2], "x", pre[3], ")");
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
