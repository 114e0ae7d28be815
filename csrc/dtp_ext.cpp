// The Python module dtp_ext._C (pybind11: build information and the switches and flags that
// dtp_ext/ops.py wraps) and the one TORCH_LIBRARY block that declares every op's schema, the
// one place each op's arguments are written (Python reads them from the registered schemas).
// The public ops' algorithms are registered once for every device (csrc/ops/block_ops.cpp); the
// private elementwise ops (leading underscore) by each device in its own file (csrc/cpu/,
// csrc/cuda/).
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/library.h>

#include <string>

#include "common/finite_check.h"
#include "common/kernel_record.h"
#include "cpu/windows_avx512.h"

namespace py = pybind11;

namespace {

// dtp_ext.NonFiniteInputError, the ValueError subclass ops.py defines and registers with
// _set_non_finite_input_error; ValueError until then.
PyObject* non_finite_input_error = nullptr;

// What a fused op's immediate finite check throws (finite_check.h): Python raises it as
// dtp_ext.NonFiniteInputError, whichever way the op was called (torch.ops, a compiled graph, an
// autograd backward), with the check's message.
struct NonFiniteInput : torch::PyTorchError {
  using torch::PyTorchError::PyTorchError;
  PyObject* python_type() override {
    return non_finite_input_error != nullptr ? non_finite_input_error : PyExc_ValueError;
  }
};

void throw_non_finite_input(const std::string& message) { throw NonFiniteInput(message); }

py::dict build_info() {
#ifdef DTP_WITH_CUDA
  const bool with_cuda = true;
  const char* archs = DTP_CUDA_ARCH_LIST;
#else
  const bool with_cuda = false;
  const char* archs = "";
#endif
#ifdef _OPENMP
  const int openmp = 1;
#else
  const int openmp = 0;
#endif
  py::dict info;
  info["cuda"] = with_cuda;
  info["cuda_arch_list"] = archs;
  info["torch_version_built"] = DTP_TORCH_VERSION;
  info["openmp"] = openmp;
  return info;
}

// Python's truth value of `value` (any object, as `bool(value)`).
bool truth(const py::object& value) { return static_cast<bool>(py::bool_(value)); }

}  // namespace

PYBIND11_MODULE(_C, m) {
  dtp_ext::set_non_finite_input_thrower(&throw_non_finite_input);
  m.def(
      "_set_non_finite_input_error",
      [](const py::object& type) {
        if (PyType_Check(type.ptr()) == 0 ||
            PyObject_IsSubclass(type.ptr(), PyExc_ValueError) != 1) {
          throw py::type_error("_set_non_finite_input_error: expects a ValueError subclass");
        }
        Py_XDECREF(non_finite_input_error);
        non_finite_input_error = type.inc_ref().ptr();  // held for the life of the process
      },
      py::arg("type"),
      "Registers the Python type (a ValueError subclass) of a refused non-finite input.");
  m.def("defer_finite_checks",
        torch::wrap_pybind_function([](int mode) { return dtp_ext::set_defer_mode(mode); }),
        py::arg("mode"),
        "Where finite checks are deferred: 0 CUDA only, 1 everywhere, 2 nowhere; returns the "
        "previous mode.");
  m.def("finite_checks_deferred_on", torch::wrap_pybind_function([](const std::string& device) {
          return dtp_ext::deferred_on(c10::Device(device));
        }),
        py::arg("device"),
        "Whether a finite check on the device is deferred under the current mode.");
  m.def("pending_non_finite", torch::wrap_pybind_function([](const std::string& device) {
          const auto flag = dtp_ext::pending_non_finite(c10::Device(device));
          return flag.defined() ? py::reinterpret_steal<py::object>(THPVariable_Wrap(flag))
                                : py::object(py::none());
        }),
        py::arg("device"),
        "The device's deferred non-finite flag (int32 0-d tensor, 0 or an op code), or None.");
  m.def("clear_non_finite", torch::wrap_pybind_function([](const std::string& device) {
          dtp_ext::clear_non_finite(c10::Device(device));
        }),
        py::arg("device"), "Resets the device's deferred flag to 0.");
  m.def("non_finite_op", &dtp_ext::non_finite_op, py::arg("code"),
        "The op a deferred flag's code stands for.");
  m.def("last_kernel", &dtp_ext::last_kernel,
        "The compiled kernel the dispatcher ran last on this thread, e.g. "
        "'dtp_ext::ldrl_feedback_loop[CPU]' ('' before any).");
  m.def("build_info", &build_info, "What this build of dtp_ext._C contains.");
  m.def(
      "set_finite_checks",
      [](const py::object& enabled) { return dtp_ext::set_finite_checks(truth(enabled)); },
      py::arg("enabled"),
      "Turns the fused ops' non-finite input checks on or off; returns the previous setting.");
  m.def("finite_checks", &dtp_ext::finite_checks_enabled,
        "Whether the fused ops reject non-finite inputs.");
  m.def(
      "set_cpu_vector_kernels",
      [](const py::object& enabled) { return dtp_ext::set_vector_windows(truth(enabled)); },
      py::arg("enabled"),
      "Switches the CPU's AVX-512 pooled-window kernels on or off; returns the previous "
      "setting.");
  m.def("cpu_vector_windows", &dtp_ext::vector_windows_written,
        "Pool windows the AVX-512 kernels have written since the library loaded.");
  m.def("cpu_vector_kernels", &dtp_ext::vector_windows_enabled,
        "Whether the CPU's pooled passes take the AVX-512 window kernels (the CPU has AVX-512 "
        "F/BW/VL and they are on).");
}

// `output` (the block's output) may be omitted only for a block without activation and pool,
// whose feedback difference does not depend on it.
// Geometry arguments shared by every op: a linear block passes empty stride/padding/dilation;
// activation is 'none', 'relu', 'elu' or 'tanh'; pool is 0 or the max-pool kernel (= stride).
TORCH_LIBRARY(dtp_ext, m) {
  m.def(
      "ldrl_loss(Tensor x, Tensor weight, Tensor? bias, Tensor feedback_weight, Tensor noise_x, "
      "Tensor noise_y, int[] stride, int[] padding, int[] dilation, int groups, str activation, "
      "int pool) -> (Tensor loss, Tensor grad_feedback_weight, Tensor grad_feedback_bias)");
  m.def(
      "ldrl_feedback_loop(Tensor x, Tensor weight, Tensor? bias, Tensor(a!) feedback_weight, "
      "Tensor(b!) feedback_bias, Tensor(c!) momentum_weight, Tensor(d!) momentum_bias, "
      "int iterations, float noise_std, float lr, float momentum, float weight_decay, "
      "int chunk_iterations, Tensor? noise_x, Tensor? noise_y, int[] stride, int[] padding, "
      "int[] dilation, int groups, str activation, int pool) -> Tensor losses");
  m.def(
      "reconstruction_feedback_loop(Tensor x, Tensor weight, Tensor? bias, "
      "Tensor(a!) feedback_weight, Tensor(b!) feedback_bias, Tensor(c!) momentum_weight, "
      "Tensor(d!) momentum_bias, int iterations, float noise_std, float lr, float momentum, "
      "float weight_decay, int chunk_iterations, Tensor? noise_x, int[] stride, int[] padding, "
      "int[] dilation, int groups, str activation, int pool) -> Tensor losses");
  m.def(
      "propagate_target(Tensor? output, Tensor? indices, Tensor delta, Tensor feedback_weight, "
      "float scale, int[] input_sizes, int[] stride, int[] padding, int[] dilation, int groups, "
      "str activation, int pool, Tensor? loss_scale=None) -> Tensor");
  m.def(
      "block_weight_grad(Tensor x, Tensor? output, Tensor? indices, Tensor delta, Tensor weight, "
      "int[] stride, int[] padding, int[] dilation, int groups, str activation, int pool) -> "
      "(Tensor grad_weight, Tensor grad_bias)");

  // The fused elementwise passes around the big products, private to the ops above. An absent
  // indices argument means "no pool" (elementwise). `channels_last` asks for the output in
  // channels-last memory (the CPU's layout for large maps); a device that never chooses it
  // refuses it. `pool` is the max-pool's kernel = stride. Each pool index must address a
  // position of its own window (as max_pool2d's do; max_unpool2d checks only the plane, but the
  // CUDA passes let each pooled element own its window): any other index is refused with an
  // error naming `op` (a device-side assert on CUDA).
  //
  // scale * (unpool(phi(a + alpha * a_noise), a_indices) - unpool(phi_b, b_indices)) as a new
  // tensor of `out_sizes` (the pre-pool shape); phi_b is already activated. Only pooled
  // positions are touched: the rest are zeros.
  m.def(
      "_phi_unpool_difference(str op, Tensor a, Tensor? a_noise, float alpha, Tensor? a_indices, "
      "Tensor phi_b, Tensor? b_indices, int[] out_sizes, int pool, str activation, float scale, "
      "bool channels_last) -> Tensor");
  // unpool(phi(s_noisy), idx_noisy) - unpool(clean_phi_output, clean_indices) straight from the
  // noisy pre-activation z_noisy = op(x + eps) + bias, with max-pool and phi fused in (the
  // window's max of phi(z) sits at the max of z). Shape of z_noisy. Without clean_phi_output the
  // clean term is left out (what vanilla DTP's reconstruction loss needs).
  m.def(
      "_noisy_difference(Tensor z_noisy, Tensor? clean_phi_output, Tensor? clean_indices, "
      "str activation, int pool, bool channels_last) -> Tensor");
  // One SGD-momentum step on a feedback parameter V, in a single pass:
  // g = grad_scale * (reconstruction - noise) + weight_decay * V; buf = momentum * buf + g;
  // V -= lr * buf (torch.optim.SGD without dampening or Nesterov). weight and momentum_buffer
  // in one dense layout (contiguous or channels-last). With a noise pairing g is the L-DRL
  // loop's gradient of the feedback weight; without one it is reconstruction_pairing alone (the
  // reconstruction loop's gradients of the feedback weight and bias). Returns
  // <V, reconstruction> - 2 <V, noise> for the V before the step (B times the L-DRL loss; a
  // reduction: float32 for a bfloat16/float16 weight), from what the pass reads anyway.
  m.def(
      "_sgd_momentum_update(Tensor(a!) weight, Tensor(b!) momentum_buffer, "
      "Tensor reconstruction_pairing, Tensor? noise_pairing, float grad_scale, "
      "float weight_decay, float momentum, float lr) -> Tensor");
  // unpool(delta * phi'(output), indices): the vector-Jacobian product of pool(phi(.)) at the
  // block's own output, as a tensor of `out_sizes`.
  m.def(
      "_activation_pool_backward(str op, Tensor output, Tensor? indices, Tensor delta, "
      "int[] out_sizes, int pool, str activation) -> Tensor");
}
