// What one DTP block is: its forward op (linear or conv2d), activation and max-pool, the checks
// of its arguments and its tensors' sizes. Its products are in block_products.h.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

namespace dtp_ext {

enum class Activation { Identity, ReLU, ELU, Tanh };

Activation parse_activation(const char* op, const std::string& name);
const char* activation_name(Activation activation);  // what parse_activation reads

struct BlockGeometry {
  bool is_conv = false;
  std::vector<int64_t> stride, padding, dilation;  // conv only (2 entries each)
  int64_t groups = 1;
  Activation activation = Activation::Identity;
  int64_t pool = 0;  // 0: no pool; k: max-pool with kernel = stride = k after the activation
  bool channels_last = false;  // run this block's convolutions in NHWC (see block_products.h)
};

// Validates the geometry arguments against the forward weight (2-D: linear, 4-D: conv).
BlockGeometry parse_geometry(const char* op, const at::Tensor& weight, at::IntArrayRef stride,
                             at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                             const std::string& activation, int64_t pool);

// Checks that x and the forward weight/bias fit the geometry, share one device and one
// floating dtype (float32/float64, or bfloat16/float16: mixed precision, where the products run
// in that dtype with float32 accumulation and the elementwise passes and reductions in
// float32). Messages name the op and the argument.
void check_block_tensors(const char* op, const BlockGeometry& g, const at::Tensor& x,
                         const at::Tensor& weight, const c10::optional<at::Tensor>& bias);
// The feedback weight has the conv weight's shape, or W^T's shape for a linear block, and x's
// dtype; with `allow_master`, float32 is accepted too when x is bfloat16/float16 (a loop that
// keeps float32 master weights and casts them to x's dtype for its products).
void check_feedback_weight(const char* op, const BlockGeometry& g, const at::Tensor& weight,
                           const at::Tensor& feedback_weight, const at::Tensor& x,
                           bool allow_master = false);

// bfloat16 or float16: a compute dtype whose elementwise passes and reductions run in float32.
inline bool is_reduced_float(const at::Tensor& t) {
  return t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf;
}
inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}
// t in float32 when it is bfloat16/float16 (for elementwise maths and reductions), else t.
inline at::Tensor to_opmath(const at::Tensor& t) {
  return t.defined() && is_reduced_float(t) ? t.to(at::kFloat) : t;
}

// The dense layout t is in: channels-last for a 4-D tensor that is channels-last and not
// contiguous, else contiguous.
inline at::MemoryFormat dense_format(const at::Tensor& t) {
  return t.dim() == 4 && !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast)
             ? at::MemoryFormat::ChannelsLast
             : at::MemoryFormat::Contiguous;
}

// A 1-D view of a dense tensor in its memory order (contiguous or channels-last): a tensor's dot
// with itself, or with another of the same layout, needs no copy.
inline at::Tensor flat(const at::Tensor& t) {
  if (t.is_contiguous()) return t.view(-1);
  TORCH_INTERNAL_ASSERT(t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast));
  return t.permute({0, 2, 3, 1}).view(-1);
}

// The conv's output map is at least 1x1 and, with a pool, at least pool x pool.
void check_map_sizes(const char* op, const BlockGeometry& g, at::IntArrayRef input_sizes,
                     const at::Tensor& weight);

void check_same_device_dtype(const char* op, const char* name, const at::Tensor& t,
                             const at::Tensor& like);

// Shape of phi(op(x)) for an input of `input_sizes`, and of the block output after pooling.
std::vector<int64_t> pre_pool_sizes(const BlockGeometry& g, at::IntArrayRef input_sizes,
                                    const at::Tensor& weight);
std::vector<int64_t> block_output_sizes(const BlockGeometry& g, at::IntArrayRef input_sizes,
                                        const at::Tensor& weight);

}  // namespace dtp_ext
