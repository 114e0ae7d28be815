// Which compiled kernel the dispatcher ran last on this thread ("dtp_ext::<op>[<device>]"):
// each device's registration records itself when it runs, so a report of "which kernel ran"
// comes from what ran, not from where the inputs live.
#pragma once

#include <string>

namespace dtp_ext {

void record_kernel(const char* op, const char* device);
const std::string& last_kernel();

}  // namespace dtp_ext
