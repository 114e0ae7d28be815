// Which compiled kernel the dispatcher ran last on this thread ("dtp_ext::<op>[<device>]"):
// each op records itself when it runs, with the device of the tensors the dispatcher chose its
// kernel for (each op's own checks refuse tensors on two devices).
#pragma once

#include <c10/core/DeviceType.h>

#include <string>

namespace dtp_ext {

void record_kernel(const char* op, c10::DeviceType device);  // op: "dtp_ext.<name>"
const std::string& last_kernel();

}  // namespace dtp_ext
