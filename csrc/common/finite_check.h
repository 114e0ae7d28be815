#pragma once
// Rejects non-finite (NaN/Inf) inputs to the fused ops, naming the argument: a NaN that
// reached a feedback loop or a target would otherwise end as NaN weights, silently.
//
// One reduction per tensor and one host synchronisation per op call (the flags of all checked
// tensors are read back together). set_finite_checks(false) turns the checks off, e.g. for a
// CUDA graph capture, which forbids host synchronisation.
#include <ATen/ATen.h>

#include <initializer_list>
#include <utility>

namespace dtp_ext {

using NamedTensor = std::pair<const char*, const at::Tensor*>;

// Raises ValueError "<op>: <name> contains non-finite values (NaN or Inf)" for the first
// offending tensor; undefined tensors are skipped.
void check_finite(const char* op, std::initializer_list<NamedTensor> tensors);

bool finite_checks_enabled();
// Returns the previous setting. Process-wide.
bool set_finite_checks(bool enabled);

}  // namespace dtp_ext
