// What one DTP block is: its forward op (linear or conv2d), activation and max-pool,
// plus the ATen-level pieces every kernel needs (forward pass, feedback map, weight pairing).
// Nothing here is device-specific: the big products go through ATen (MKL/oneDNN on the CPU,
// cuBLAS/cuDNN on the GPU); the fused elementwise passes live in csrc/ldrl/*_{cpu,cuda}.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

namespace dtp_ext {

enum class Activation { Identity, ReLU, ELU, Tanh };

Activation parse_activation(const char* op, const std::string& name);

struct BlockGeometry {
  bool is_conv = false;
  std::vector<int64_t> stride, padding, dilation;  // conv only (2 entries each)
  int64_t groups = 1;
  Activation activation = Activation::Identity;
  int64_t pool = 0;  // 0: no pool; k: max-pool with kernel = stride = k after the activation
  bool channels_last = false;  // run this block's convolutions in NHWC (see use_channels_last)
};

// On the CPU, oneDNN's convolutions on large maps run markedly faster on channels-last tensors
// (measured 1.6-1.8x at 16x16 maps for the three products L-DRL needs) even counting the
// layout conversions; on small maps NCHW is as fast or faster. Decides it for this input.
void use_channels_last(BlockGeometry& g, at::IntArrayRef input_sizes, const at::Device& device);
// t in the layout the block's convolutions take (a no-op unless channels_last was chosen).
at::Tensor conv_layout(const BlockGeometry& g, const at::Tensor& t);

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

// The conv's output map is at least 1x1 and, with a pool, at least pool x pool.
void check_map_sizes(const char* op, const BlockGeometry& g, at::IntArrayRef input_sizes,
                     const at::Tensor& weight);

void check_same_device_dtype(const char* op, const char* name, const at::Tensor& t,
                             const at::Tensor& like);

at::Tensor activate(Activation activation, const at::Tensor& z);

// op(x) + bias: the block's pre-activation.
at::Tensor preactivation(const BlockGeometry& g, const at::Tensor& x, const at::Tensor& weight,
                         const c10::optional<at::Tensor>& bias);

// Clean forward pass s = pool(phi(op(x))). `indices` is undefined when there is no pool.
struct BlockOutput {
  at::Tensor output;
  at::Tensor indices;
  std::vector<int64_t> pre_pool_sizes;  // shape of phi(op(x)): the feedback map's input shape
};
BlockOutput forward_block(const BlockGeometry& g, const at::Tensor& x, const at::Tensor& weight,
                          const c10::optional<at::Tensor>& bias);

// The linear part of the feedback block, A_V u: u @ V^T (linear) or the transposed conv with
// weight V (no kernel flip), producing a tensor of `input_sizes` (the block input's shape).
at::Tensor apply_feedback(const BlockGeometry& g, const at::Tensor& u,
                          const at::Tensor& feedback_weight, at::IntArrayRef input_sizes);

// d/dV of sum(p * A_V(q)): p^T q (linear) or the conv weight gradient with input p and
// grad_output q. The gradient pairing used by both terms of the L-DRL loss.
at::Tensor feedback_pairing(const BlockGeometry& g, const at::Tensor& p, const at::Tensor& q,
                            const at::Tensor& feedback_weight);

// Whether feedback_pairing runs in float32 on float32 copies (a bfloat16/float16 conv block on
// the CPU outside the small-map GEMM path); callers may then hand it float32 operands directly.
bool pairs_in_float32(const BlockGeometry& g, const at::Tensor& p, const at::Tensor& q,
                      const at::Tensor& feedback_weight);

// Shape of phi(op(x)) for an input of `input_sizes`, and of the block output after pooling.
std::vector<int64_t> pre_pool_sizes(const BlockGeometry& g, at::IntArrayRef input_sizes,
                                    const at::Tensor& weight);
std::vector<int64_t> block_output_sizes(const BlockGeometry& g, at::IntArrayRef input_sizes,
                                        const at::Tensor& weight);

}  // namespace dtp_ext
