// The ATen-level pieces of a block that every op needs: activation, forward pass, feedback map
// and weight pairing, and the layout its convolutions run in. Nothing here is device-specific:
// the big products go through ATen (MKL/oneDNN on the CPU, cuBLAS/cuDNN on the GPU); each
// device's own code decides its convolutions' layout (register_channels_last_rule).
#pragma once

#include "block_geometry.h"

namespace dtp_ext {

// Whether a device runs a conv block's convolutions channels-last, given the conv's output
// positions: a rule the device's kernel file registers (the CPU's: large maps); a device
// without one runs them NCHW. Returns true, for a static initialiser.
using ChannelsLastRule = bool (*)(int64_t output_positions);
bool register_channels_last_rule(c10::DeviceType device, ChannelsLastRule rule);
// Decides g.channels_last for this input on this device.
void use_channels_last(BlockGeometry& g, at::IntArrayRef input_sizes, const at::Device& device);
// t in the layout the block's convolutions take (a no-op unless channels_last was chosen).
at::Tensor conv_layout(const BlockGeometry& g, const at::Tensor& t);

at::Tensor activate(Activation activation, const at::Tensor& z);

// A conv that reads its whole input at every output position (stride and dilation 1, input +
// padding within the kernel: a 3x3 conv with padding 1 on a 2x2 or 1x1 map) is one dense
// matrix product; its weight unrolled to [Cout*OH*OW, Cin*H*W] (NCHW order on both sides), or
// undefined for any other block. The feedback loops build it once per call: their batched
// noisy passes are one GEMM (much faster than oneDNN's conv at such small maps:
// benchmarks/RESULTS.md, Kernel choices).
at::Tensor unrolled_conv_weight(const BlockGeometry& g, at::IntArrayRef input_sizes,
                                const at::Tensor& weight);

// op(x) + bias: the block's pre-activation (through `unrolled` when it is defined).
at::Tensor preactivation(const BlockGeometry& g, const at::Tensor& x, const at::Tensor& weight,
                         const c10::optional<at::Tensor>& bias,
                         const at::Tensor& unrolled = at::Tensor());

// Clean forward pass s = pool(phi(op(x))). `indices` is undefined when there is no pool.
struct BlockOutput {
  at::Tensor output;
  at::Tensor indices;
  std::vector<int64_t> pre_pool_sizes;  // shape of phi(op(x)): the feedback map's input shape
};
BlockOutput forward_block(const BlockGeometry& g, const at::Tensor& x, const at::Tensor& weight,
                          const c10::optional<at::Tensor>& bias,
                          const at::Tensor& unrolled = at::Tensor());

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

}  // namespace dtp_ext
