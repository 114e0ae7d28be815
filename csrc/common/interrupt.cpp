#include "interrupt.h"

#include <Python.h>
#include <pybind11/pybind11.h>

namespace dtp_ext {

void InterruptPoll::poll() {
  const auto now = std::chrono::steady_clock::now();
  if (now - last_ < interval_) return;
  last_ = now;
  if (!Py_IsInitialized()) return;
  pybind11::gil_scoped_acquire gil;
  if (PyErr_CheckSignals() != 0) throw pybind11::error_already_set();
}

}  // namespace dtp_ext
