#include "finite_check.h"

#include <atomic>
#include <vector>

namespace dtp_ext {
namespace {
std::atomic<bool> checks_enabled{true};
}  // namespace

bool finite_checks_enabled() { return checks_enabled.load(); }

bool set_finite_checks(bool enabled) { return checks_enabled.exchange(enabled); }

void check_finite(const char* op, std::initializer_list<NamedTensor> tensors) {
  if (!finite_checks_enabled()) return;
  std::vector<const char*> names;
  std::vector<at::Tensor> flags;
  for (const auto& [name, tensor] : tensors) {
    if (tensor == nullptr || !tensor->defined() || !tensor->is_floating_point()) continue;
    names.push_back(name);
    flags.push_back(at::isfinite(*tensor).all());
  }
  if (flags.empty()) return;
  const auto finite = at::stack(flags).cpu();  // the one synchronisation
  const auto* ok = finite.data_ptr<bool>();
  for (size_t i = 0; i < names.size(); ++i) {
    TORCH_CHECK_VALUE(ok[i], op, ": ", names[i],
                      " contains non-finite values (NaN or Inf); every input of a fused op must "
                      "be finite");
  }
}

}  // namespace dtp_ext
