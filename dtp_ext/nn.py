"""Drop-in DTP layers: dtp_ext.Linear and dtp_ext.Conv2d.

Each is a subclass of its torch.nn twin with the same forward weights and state_dict keys, plus
two buffers, `feedback_weight` and `feedback_bias` (docs/maths.md §1). They are buffers, not parameters,
on purpose: autograd never trains them (FeedbackTrainer's fused loop does), so the optimizer
you build from `model.parameters()` can never touch them, while state_dict, `.to()` and
checkpoints carry them like any weight.

A block computes s = pool(phi(op(x))). Its backward pass (docs/maths.md §3) returns weight gradients by
the block's own local vector-Jacobian product, and hands the previous block the difference
target in gradient units, delta_in = (G(s) - G(s - beta*B*delta)) / (beta*B).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import functional, loss_scaling, ops
from .functional import ACTIVATIONS
from .ops import BlockGeometry

# Counts training-mode block forwards. A tensor, not an int: torch.compile traces its increment
# into the graph, where a Python int would be specialised on and recompiled at every call.
_FORWARD_CLOCK = torch.zeros((), dtype=torch.int64)


# Largest beta a block takes: the target step beta * B * delta must stay finite in float32.
MAX_BETA = 1e6


def _check_block_options(cls_name: str, activation, pool, beta):
    if activation not in ACTIVATIONS:
        raise ValueError(f"{cls_name}: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if pool is not None and (isinstance(pool, bool) or not isinstance(pool, int) or pool < 1):
        raise ValueError(
            f"{cls_name}: pool must be None or an int >= 1 (max-pool kernel = stride), got {pool!r}"
        )
    if (
        isinstance(beta, bool)
        or not isinstance(beta, (int, float))
        or not math.isfinite(beta)
        or not 0 < beta <= MAX_BETA
    ):
        raise ValueError(f"{cls_name}: beta must be a number in (0, {MAX_BETA:g}], got {beta!r}")


class _DTPBlockFunction(torch.autograd.Function):
    """Forward: the block. Backward: weight gradients + difference target for the input."""

    @staticmethod
    def forward(ctx, x, weight, bias, block):
        output, indices = block.forward_with_indices(x, weight, bias)
        geometry = block.geometry()
        needs_output = geometry.activation != "none" or geometry.pool > 0
        # The feedback weight is read at backward time, on purpose: the freshly trained one.
        ctx.block = block
        ctx.geometry = geometry
        ctx.beta = block.beta
        # A copy of the output: the caller may modify the returned tensor in place (as
        # torch.nn's max-pool allows), and the backward needs the values the forward produced.
        ctx.save_for_backward(x, weight, output.clone() if needs_output else None, indices)
        return output

    @staticmethod
    def backward(ctx, delta):
        x, weight, output, indices = ctx.saved_tensors
        delta = delta.contiguous()
        grad_x = grad_weight = grad_bias = None
        if x.shape[0] == 0:  # an empty batch: torch.nn's zero parameter gradients
            return (
                torch.zeros_like(x) if ctx.needs_input_grad[0] else None,
                torch.zeros_like(weight) if ctx.needs_input_grad[1] else None,
                torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
                if ctx.needs_input_grad[2]
                else None,
                None,
            )
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            grad_weight, grad_bias = ops.block_weight_grad(
                x, output, indices, delta, weight, ctx.geometry
            )
            if not ctx.needs_input_grad[2]:
                grad_bias = None
        if ctx.needs_input_grad[0]:
            # Float32 master feedback weights under autocast: the target's product runs in the
            # dtype the forward saved (what delta arrives in).
            feedback_weight = ctx.block.target_feedback_weight
            if feedback_weight.dtype != delta.dtype:
                feedback_weight = feedback_weight.to(delta.dtype)
            grad_x = _propagate_target(
                output,
                indices,
                delta,
                feedback_weight,
                ctx.beta * x.shape[0],
                x.shape,
                ctx.geometry,
            )
        return grad_x, grad_weight, grad_bias, None


def _propagate_target(output, indices, delta, feedback_weight, step, input_shape, geometry):
    """docs/maths.md §3's target step beta*B*delta for a loss scaled by dtp_ext.loss_scale(k): the true
    step is beta*B*delta/k, and the returned delta_in is k times the unscaled one."""
    if torch.compiler.is_compiling():
        # The scale read at run time through an op (a Python float would be frozen into the
        # graph) and divided out of the step inside propagate_target, as eager does.
        return ops.propagate_target(
            output,
            indices,
            delta,
            feedback_weight,
            step,
            input_shape,
            geometry,
            loss_scale=ops.current_loss_scale(delta),
        )
    return ops.propagate_target(
        output,
        indices,
        delta,
        feedback_weight,
        step / loss_scaling.current_loss_scale(),
        input_shape,
        geometry,
    )


def _autocast_dtype(x, weight) -> torch.dtype | None:
    """The dtype a block's op runs in under torch.autocast on x's device (None: no autocast,
    or nothing to cast: autocast lowers only float32 tensors)."""
    device = x.device.type
    if not torch.is_autocast_enabled(device):
        return None
    dtype = torch.get_autocast_dtype(device)
    if dtype == x.dtype == weight.dtype or torch.float32 not in (x.dtype, weight.dtype):
        return None
    return dtype


def forward_clock() -> int:
    """The count of training-mode block forwards so far (blocks' forward_stamp values are
    taken from it)."""
    return int(_FORWARD_CLOCK)


def _draw_feedback(block, bias_bound: float, generator: torch.Generator | None):
    """A block's feedback init: kaiming_uniform_(a=sqrt(5)) for the weight (torch.nn's default
    layer init) and U(-bias_bound, bias_bound) for the bias, drawn from `generator` (None:
    torch's global generator, in place, as torch.nn's layers draw theirs). A given generator's
    values are drawn on its own device in the buffer's dtype and copied, so a CPU generator
    serves a block on any device with the same distribution; a block on the meta device has no
    values to draw."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"{type(block).__name__}.reset_feedback_parameters: generator must be a "
            f"torch.Generator or None, got {type(generator).__name__}"
        )

    def weight_init(t, gen):
        nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=gen)

    def bias_init(t, gen):
        nn.init.uniform_(t, -bias_bound, bias_bound, generator=gen)

    for tensor, init in ((block.feedback_weight, weight_init), (block.feedback_bias, bias_init)):
        if generator is None:
            init(tensor, None)
        elif tensor.device.type != "meta":
            drawn = torch.empty(tensor.shape, dtype=tensor.dtype, device=generator.device)
            init(drawn, generator)
            with torch.no_grad():
                tensor.copy_(drawn)


def _recomputing_in_backward() -> bool:
    """Whether autograd's engine is running a backward pass: a block forward then is activation
    checkpointing's recomputation. (Compiled code never runs a block forward inside backward:
    torch.compile handles checkpointing within its own graphs.)"""
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


def start_forward_pass(model: nn.Module, *args) -> None:
    """Open a forward pass for `model`'s DTP blocks: until end_forward_pass, a block's first
    training call starts its recorded inputs afresh and its further calls add theirs. Nested
    opens (a tracked model inside a tracked model) count as one pass. Activation
    checkpointing's recomputation inside backward() opens nothing."""
    if _recomputing_in_backward():
        return
    for module in model.modules():
        if isinstance(module, DTPBlock):
            if module._pass_depth == 0:
                module._pass_fresh = True
            module._pass_depth += 1


def end_forward_pass(model: nn.Module, *args) -> None:
    """Close what start_forward_pass(model) opened."""
    if _recomputing_in_backward():
        return
    for module in model.modules():
        if isinstance(module, DTPBlock) and module._pass_depth > 0:
            module._pass_depth -= 1


def track_forward_passes(model: nn.Module) -> None:
    """Make each call of `model` one forward pass for its DTP blocks: a block called several
    times in it (weights shared across positions) records all those inputs, and its feedback
    trains on them together. FeedbackTrainer does this for the model it is given; blocks called
    outside a tracked forward keep the input of their latest call. Once per model (hooks on it,
    module-level functions so the model still pickles; plain attribute updates that
    torch.compile traces without a graph break)."""
    if start_forward_pass not in model._forward_pre_hooks.values():
        model.register_forward_pre_hook(start_forward_pass)
        model.register_forward_hook(end_forward_pass, always_call=True)


class DTPBlock:
    """Behaviour shared by dtp_ext.Linear and dtp_ext.Conv2d (a mixin over the nn module)."""

    activation: str | None
    pool: int | None
    beta: float

    def _init_dtp(self, activation, pool, beta, feedback_shape, feedback_bias_size, factory):
        _check_block_options(type(self).__name__, activation, pool, beta)
        self.activation = activation
        self.pool = pool
        self.beta = float(beta)
        self.register_buffer("feedback_weight", torch.empty(feedback_shape, **factory))
        self.register_buffer("feedback_bias", torch.empty(feedback_bias_size, **factory))
        # The feedback weight averaged over steps (docs/maths.md §7), set by a FeedbackTrainer
        # that averages: targets use it. Not persistent: the trainer's state_dict carries it,
        # so the model's state_dict keys stay torch.nn's plus the two feedback buffers.
        self.register_buffer("feedback_weight_average", None, persistent=False)
        self.reset_feedback_parameters()
        # Inputs of this block's calls in the latest training forward pass (several when the
        # model calls it more than once: see track_forward_passes), and whether that pass is
        # still running.
        self._recorded_inputs: list[torch.Tensor] = []
        self._pass_depth = 0  # open tracked forward passes around it (start_forward_pass)
        self._pass_fresh = False  # the open pass has not recorded this block yet
        # Data flow of the latest training-mode forward: whether the input required grad (it
        # then needs a target, so FeedbackTrainer trains this block; None: not seen with
        # autograd on) and when the block ran (FeedbackTrainer orders blocks by it).
        self._input_needs_target: bool | None = None
        self._forward_stamp: torch.Tensor | None = None

    # -- subclass hooks -------------------------------------------------------------------
    def functional_kwargs(self) -> dict:
        """This block's options as dtp_ext.functional's block_forward/feedback_block take them."""
        raise NotImplementedError

    def geometry(self) -> BlockGeometry:
        raise NotImplementedError

    # -- forward --------------------------------------------------------------------------
    def forward_block(self, x, weight=None, bias=None):
        """(s, pool indices or None, shape of phi(op(x))) of s = pool(phi(op(x))), x in the op's
        layout, with autograd on whatever requires grad; the block's own weights unless others
        are given. The one forward of a block: the layer, the reference and the training
        command's baselines all run it."""
        return functional.block_forward(
            x,
            self.weight if weight is None else weight,
            self.bias if bias is None else bias,
            **self.functional_kwargs(),
        )

    def forward_with_indices(self, x, weight=None, bias=None):
        """(s, pool indices or None): forward_block without the pre-pool shape."""
        return self.forward_block(x, weight, bias)[:2]

    def _dtp_forward(self, x):
        """x in the kernels' layout: (B, in) for Linear, (N, C, H, W) for Conv2d."""
        weight, bias = self.weight, self.bias
        dtype = _autocast_dtype(x, weight)
        if dtype is not None:
            # Under torch.autocast the block runs in the autocast dtype, as nn.Linear/nn.Conv2d's
            # op would: differentiable casts, so the parameters' gradients come back in their
            # own dtype (float32) and the input's in its own.
            x, weight = x.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        if self.training:
            self._record(x)
        if torch.is_grad_enabled() and (
            x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
        ):
            return _DTPBlockFunction.apply(x, weight, bias, self)
        return self.forward_with_indices(x, weight, bias)[0]

    @property
    def target_feedback_weight(self) -> torch.Tensor:
        """The feedback weight targets are propagated with: the trainer's average of
        `feedback_weight` over steps when it keeps one, else `feedback_weight` itself."""
        average = self.feedback_weight_average
        return self.feedback_weight if average is None else average

    def _record(self, x):
        """Keep what FeedbackTrainer.step() trains on: the input of the latest training forward
        pass, and when and with what data flow the block ran in it."""
        if _recomputing_in_backward():
            # Activation checkpointing re-runs the block inside backward() on the input of the
            # forward pass it replays: not a new forward pass, so no new input or stamp. Its
            # reentrant variant ran that pass without autograd; the replay, with autograd on,
            # tells whether the input needs a target.
            # Replays run in reverse order and one block may be replayed several times: a
            # replay only ever adds that an input needs a target.
            if torch.is_grad_enabled() and (x.requires_grad or self._input_needs_target is None):
                self._input_needs_target = x.requires_grad
            return
        if self._pass_fresh or self._pass_depth == 0:
            # The first call of a pass: a further call of the same tracked model forward keeps
            # this stamp (forward order is first use) and adds its input to this one's.
            # A new list, not the old one cleared: torch.compile then never reads (and guards
            # on) what the previous pass left.
            self._pass_fresh = False
            self._recorded_inputs = [x.detach()]
            self._forward_stamp = _FORWARD_CLOCK.add_(1).clone()
            if torch.is_grad_enabled():
                self._input_needs_target = x.requires_grad
            return
        if torch.is_grad_enabled():
            self._input_needs_target = bool(self._input_needs_target) or x.requires_grad
        self._recorded_inputs.append(x.detach())

    def recorded_calls(self) -> list[torch.Tensor]:
        """The inputs of the block's calls in the latest training forward pass, one per call."""
        return list(self._recorded_inputs)

    @property
    def recorded_input(self) -> torch.Tensor | None:
        """Input of the latest training-mode forward pass (None before the first one). A block
        the model called several times in one forward pass (weights shared across positions)
        has all those inputs, concatenated along the batch, when a FeedbackTrainer tracks the
        model's forward passes (track_forward_passes)."""
        inputs = self._recorded_inputs
        if not inputs:
            return None
        if len(inputs) > 1:
            shapes = sorted({tuple(t.shape[1:]) for t in inputs})
            if len(shapes) > 1:
                raise RuntimeError(
                    f"{type(self).__name__}: the model called this block {len(inputs)} times in "
                    f"one forward pass, on inputs of per-sample shapes {shapes}; its feedback "
                    "trains on all of them concatenated along the batch, which needs one shape. "
                    "Leave it out of FeedbackTrainer(blocks=...), or give each use its own block"
                )
            inputs[:] = [torch.cat(inputs)]
        return inputs[0]

    @property
    def input_needs_target(self) -> bool | None:
        """Whether the input of the latest training-mode forward pass with autograd on required
        grad, i.e. something trainable produced it and it needs a target (docs/maths.md §5); None
        before such a pass."""
        return self._input_needs_target

    @property
    def forward_stamp(self) -> int | None:
        """A process-wide counter value taken at this block's latest training-mode forward:
        blocks sorted by it are in forward execution order."""
        return None if self._forward_stamp is None else int(self._forward_stamp)

    def clear_recorded_input(self):
        self._recorded_inputs.clear()

    def extra_repr(self):
        extra = f", activation={self.activation!r}" if self.activation else ""
        extra += f", pool={self.pool}" if self.pool else ""
        return super().extra_repr() + extra + f", beta={self.beta}"


class Linear(DTPBlock, nn.Linear):
    """nn.Linear with a learned feedback block G(y) = V phi(y) + c, V of shape (in, out)."""

    def __init__(
        self,
        in_features,
        out_features,
        bias=True,
        device=None,
        dtype=None,
        *,
        activation=None,
        beta=0.7,
    ):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_dtp(
            activation,
            None,
            beta,
            (in_features, out_features),
            in_features,
            {"device": device, "dtype": dtype},
        )

    def reset_feedback_parameters(self, generator: torch.Generator | None = None):
        """Draw feedback_weight and feedback_bias afresh, with PyTorch's default init of
        nn.Linear(out_features, in_features), independently of the forward weights.
        `generator`: where the draws come from (None: torch's global generator)."""
        bound = 1 / math.sqrt(self.out_features) if self.out_features > 0 else 0
        _draw_feedback(self, bound, generator)

    def functional_kwargs(self):
        return {"activation": self.activation}

    def geometry(self):
        return BlockGeometry(activation=self.activation or "none")

    def forward(self, x):
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"dtp_ext.Linear: input must have {self.in_features} features in its "
                f"last dimension, got shape {tuple(x.shape)}"
            )
        rows = x.reshape(-1, self.in_features)  # every row is a sample of the batch mean
        return self._dtp_forward(rows).reshape(*x.shape[:-1], self.out_features)


def _numeric_padding(padding, kernel_size, dilation):
    if padding == "valid":
        return (0, 0)
    if padding == "same":
        totals = [d * (k - 1) for d, k in zip(dilation, kernel_size)]
        if any(t % 2 for t in totals):
            raise ValueError(
                "dtp_ext.Conv2d: padding='same' needs an odd effective kernel size "
                f"(symmetric padding), got kernel_size={kernel_size}, dilation={dilation}"
            )
        return tuple(t // 2 for t in totals)
    return tuple(padding)


class Conv2d(DTPBlock, nn.Conv2d):
    """nn.Conv2d (+ activation, + max-pool) with a learned transposed-conv feedback block.

    The feedback weight has the conv weight's shape (Cout, Cin/groups, kH, kW); with an
    identical tensor the feedback's linear part is the exact adjoint of the conv (docs/maths.md §1).
    """

    def __init__(
        self,
        in_channels,
        out_channels,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups=1,
        bias=True,
        padding_mode="zeros",
        device=None,
        dtype=None,
        *,
        activation=None,
        pool=None,
        beta=0.7,
    ):
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=bias,
            padding_mode=padding_mode,
            device=device,
            dtype=dtype,
        )
        if padding_mode != "zeros":
            raise ValueError(
                "dtp_ext.Conv2d: padding_mode must be 'zeros' (the feedback block is "
                f"the adjoint of a zero-padded conv), got {padding_mode!r}"
            )
        # padding as numbers (nn.Conv2d also accepts 'same'/'valid'): what the feedback block's
        # transposed conv and the kernels take.
        self.numeric_padding = _numeric_padding(self.padding, self.kernel_size, self.dilation)
        self._init_dtp(
            activation,
            pool,
            beta,
            self.weight.shape,
            in_channels,
            {"device": device, "dtype": dtype},
        )

    def reset_feedback_parameters(self, generator: torch.Generator | None = None):
        """Draw feedback_weight and feedback_bias afresh, with PyTorch's default init of the
        matching nn.ConvTranspose2d, independently of the forward weights. `generator`: where
        the draws come from (None: torch's global generator)."""
        fan_in, _ = nn.init._calculate_fan_in_and_fan_out(self.feedback_weight)
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
        _draw_feedback(self, bound, generator)

    def functional_kwargs(self):
        return {
            "activation": self.activation,
            "pool": self.pool,
            "stride": self.stride,
            "padding": self.numeric_padding,
            "dilation": self.dilation,
            "groups": self.groups,
        }

    def geometry(self):
        return BlockGeometry(
            tuple(self.stride),
            tuple(self.numeric_padding),
            tuple(self.dilation),
            self.groups,
            self.activation or "none",
            self.pool if self.pool and self.pool > 1 else 0,
        )

    def forward(self, x):
        if x.dim() == 3:  # unbatched (C, H, W), as nn.Conv2d accepts
            return self.forward(x.unsqueeze(0)).squeeze(0)
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"dtp_ext.Conv2d: input must be (N, {self.in_channels}, H, W), "
                f"got shape {tuple(x.shape)}"
            )
        if self.pool and self.pool > 1:
            size = [
                (
                    x.shape[2 + d]
                    + 2 * self.numeric_padding[d]
                    - self.dilation[d] * (self.kernel_size[d] - 1)
                    - 1
                )
                // self.stride[d]
                + 1
                for d in range(2)
            ]
            if min(size) < self.pool:
                raise ValueError(
                    f"dtp_ext.Conv2d: pool={self.pool} is larger than the conv's output "
                    f"map ({size[0]}x{size[1]} for an input of {x.shape[2]}x{x.shape[3]})"
                )
        return self._dtp_forward(x)


def dtp_blocks(model: nn.Module):
    """(name, block) for every DTP block of `model`, in registration order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, DTPBlock)]
