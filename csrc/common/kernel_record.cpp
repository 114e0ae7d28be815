#include "kernel_record.h"

namespace dtp_ext {
namespace {
thread_local std::string last;
}  // namespace

void record_kernel(const char* op, c10::DeviceType device) {
  last = std::string("dtp_ext::") + op + "[" + c10::DeviceTypeName(device) + "]";
}

const std::string& last_kernel() { return last; }

}  // namespace dtp_ext
