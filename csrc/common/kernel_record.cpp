#include "kernel_record.h"

namespace dtp_ext {
namespace {
thread_local std::string last;
}  // namespace

void record_kernel(const char* op, c10::DeviceType device) {
  const std::string name(op);  // "dtp_ext.<op>", as the ops' messages name it
  last = "dtp_ext::" + name.substr(name.find('.') + 1) + "[" + c10::DeviceTypeName(device) + "]";
}

const std::string& last_kernel() { return last; }

}  // namespace dtp_ext
