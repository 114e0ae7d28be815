// Long loops inside an op stay interruptible: Ctrl-C (SIGINT) reaches Python's handlers, whose
// exception (KeyboardInterrupt) then leaves the op. Ops run with the GIL released; the check
// takes it briefly, at most every `interval_ms`, so it costs nothing measurable per iteration.
#pragma once

#include <chrono>

namespace dtp_ext {

class InterruptPoll {
 public:
  explicit InterruptPoll(int interval_ms = 100)
      : interval_(interval_ms), last_(std::chrono::steady_clock::now()) {}
  // Runs pending Python signal handlers if `interval_ms` passed since the last check; throws
  // the Python exception a handler raised.
  void poll();

 private:
  std::chrono::milliseconds interval_;
  std::chrono::steady_clock::time_point last_;
};

}  // namespace dtp_ext
