#pragma once
// Rejects non-finite (NaN/Inf) inputs to the fused ops: a NaN that reached a feedback loop or a
// target would otherwise end as NaN weights, silently.
//
// Immediate checks (the default on the CPU) throw "<op>: <name> contains non-finite values"
// before the op writes anything: one reduction per tensor and one read of the flags per call, a
// host synchronisation on a GPU. What they throw is the installed thrower's exception (the
// Python module's: dtp_ext.NonFiniteInputError, a ValueError), else a c10::ValueError. Deferred
// checks (the default on CUDA) never synchronise: each call folds "some input was not finite" into
// a per-device flag tensor holding the op's code, which the caller reads once per step
// (FeedbackTrainer's divergence guard, or dtp_ext.ops.check_non_finite()).
#include <ATen/ATen.h>

#include <initializer_list>
#include <string>
#include <utility>

namespace dtp_ext {

using NamedTensor = std::pair<const char*, const at::Tensor*>;

// Whether every element of `tensor` is finite, as a 0-dim bool tensor on its device (one pass).
at::Tensor all_finite_of(const at::Tensor& tensor);

// Checks the defined floating tensors among `tensors` (all on one device).
void check_finite(const char* op, std::initializer_list<NamedTensor> tensors);

// Throws the exception of a refused input with `message`; must not return.
using NonFiniteInputThrower = void (*)(const std::string& message);
void set_non_finite_input_thrower(NonFiniteInputThrower thrower);

bool finite_checks_enabled();
// Returns the previous setting. Process-wide.
bool set_finite_checks(bool enabled);

// Where checks are deferred: 0 on CUDA devices only (default), 1 everywhere, 2 nowhere.
int defer_mode();
int set_defer_mode(int mode);  // returns the previous mode
// Whether a check of tensors on `device` is deferred under the current mode (else it reads its
// result on the host).
bool deferred_on(const c10::Device& device);

// The device's flag (int32 0-d: 0, or the code of an op that saw a non-finite input since the
// last clear); undefined before any deferred check ran on that device.
at::Tensor pending_non_finite(const c10::Device& device);
void clear_non_finite(const c10::Device& device);
// The op a code stands for ("" for 0).
std::string non_finite_op(int64_t code);

}  // namespace dtp_ext
