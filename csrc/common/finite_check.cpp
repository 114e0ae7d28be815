#include "finite_check.h"

#include <atomic>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace dtp_ext {
namespace {
std::atomic<bool> checks_enabled{true};
std::atomic<int> deferring{0};
std::atomic<NonFiniteInputThrower> thrower{nullptr};

std::mutex registry_mutex;
std::vector<std::string> op_names{""};  // code -> op; code 0 means "all finite"
std::unordered_map<c10::Device, at::Tensor> flags;

int64_t op_code(const char* op) {  // registry_mutex held
  for (size_t i = 1; i < op_names.size(); ++i) {
    if (op_names[i] == op) return static_cast<int64_t>(i);
  }
  op_names.emplace_back(op);
  return static_cast<int64_t>(op_names.size() - 1);
}
}  // namespace

bool deferred_on(const c10::Device& device) {
  const int mode = deferring.load();
  return mode == 1 || (mode == 0 && device.is_cuda());
}

void set_non_finite_input_thrower(NonFiniteInputThrower t) { thrower.store(t); }

bool finite_checks_enabled() { return checks_enabled.load(); }
bool set_finite_checks(bool enabled) { return checks_enabled.exchange(enabled); }
int defer_mode() { return deferring.load(); }
int set_defer_mode(int mode) {
  TORCH_CHECK(mode >= 0 && mode <= 2, "dtp_ext: defer mode must be 0, 1 or 2, got ", mode);
  return deferring.exchange(mode);
}

at::Tensor all_finite_of(const at::Tensor& tensor) {
  // One pass over the tensor, no temporaries of its size: its extremes are finite exactly when
  // every element is (aminmax propagates NaN). isfinite(t).all() made four passes and three
  // full-size temporaries, as costly as a feedback iteration of a wide layer.
  if (tensor.numel() == 0) return at::ones({}, tensor.options().dtype(at::kBool));
  const auto [low, high] = at::aminmax(tensor);
  return at::isfinite(low).logical_and(at::isfinite(high));
}

void check_finite(const char* op, std::initializer_list<NamedTensor> tensors) {
  if (!finite_checks_enabled()) return;
  std::vector<const char*> names;
  std::vector<at::Tensor> finite;
  for (const auto& [name, tensor] : tensors) {
    if (tensor == nullptr || !tensor->defined() || !tensor->is_floating_point()) continue;
    names.push_back(name);
    finite.push_back(all_finite_of(*tensor));
  }
  if (finite.empty()) return;
  const auto all_finite = at::stack(finite);
  const auto device = all_finite.device();
  if (deferred_on(device)) {
    std::lock_guard<std::mutex> lock(registry_mutex);
    auto& flag = flags[device];
    if (!flag.defined()) flag = at::zeros({}, all_finite.options().dtype(at::kInt));
    // No synchronisation: the flag takes this op's code where an input was not finite.
    flag.masked_fill_(all_finite.all().logical_not(), op_code(op));
    return;
  }
  const auto ok = all_finite.cpu();  // the one synchronisation
  const auto* ok_ptr = ok.data_ptr<bool>();
  for (size_t i = 0; i < names.size(); ++i) {
    if (ok_ptr[i]) continue;
    const auto message = c10::str(op, ": ", names[i],
                                  " contains non-finite values (NaN or Inf); every input of a "
                                  "fused op must be finite");
    if (const auto t = thrower.load()) t(message);
    TORCH_CHECK_VALUE(false, message);
  }
}

at::Tensor pending_non_finite(const c10::Device& device) {
  std::lock_guard<std::mutex> lock(registry_mutex);
  const auto it = flags.find(device);
  return it == flags.end() ? at::Tensor() : it->second;
}

void clear_non_finite(const c10::Device& device) {
  std::lock_guard<std::mutex> lock(registry_mutex);
  const auto it = flags.find(device);
  if (it != flags.end()) it->second.zero_();
}

std::string non_finite_op(int64_t code) {
  std::lock_guard<std::mutex> lock(registry_mutex);
  return code > 0 && code < static_cast<int64_t>(op_names.size()) ? op_names[code] : "";
}

}  // namespace dtp_ext
