#include "kernel_record.h"

namespace dtp_ext {
namespace {
thread_local std::string last;
}  // namespace

void record_kernel(const char* op, const char* device) {
  last = std::string("dtp_ext::") + op + "[" + device + "]";
}

const std::string& last_kernel() { return last; }

}  // namespace dtp_ext
