// Module init and the one TORCH_LIBRARY block that declares every op's schema. The public ops'
// algorithms are registered once for every device (csrc/ops/block_ops.cpp); the private
// elementwise ops (leading underscore) by each device in its own file (csrc/cpu/, csrc/cuda/).
#include <Python.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/library.h>

#include <string>

#include "common/finite_check.h"
#include "common/kernel_record.h"
#include "cpu/windows_avx512.h"

namespace {

PyObject* build_info(PyObject*, PyObject*) {
#ifdef DTP_WITH_CUDA
  const bool with_cuda = true;
  const char* archs = DTP_CUDA_ARCH_LIST;
#else
  const bool with_cuda = false;
  const char* archs = "";
#endif
  return Py_BuildValue("{s:O,s:s,s:s,s:i}", "cuda", with_cuda ? Py_True : Py_False,
                       "cuda_arch_list", archs, "torch_version_built", DTP_TORCH_VERSION, "openmp",
#ifdef _OPENMP
                       1
#else
                       0
#endif
  );
}

PyObject* set_finite_checks(PyObject*, PyObject* enabled) {
  const int value = PyObject_IsTrue(enabled);
  if (value < 0) return nullptr;
  return PyBool_FromLong(dtp_ext::set_finite_checks(value != 0));
}

PyObject* finite_checks(PyObject*, PyObject*) {
  return PyBool_FromLong(dtp_ext::finite_checks_enabled());
}

PyObject* defer_finite_checks(PyObject*, PyObject* mode) {
  HANDLE_TH_ERRORS
  const long value = PyLong_AsLong(mode);
  if (value == -1 && PyErr_Occurred()) return nullptr;
  return PyLong_FromLong(dtp_ext::set_defer_mode(static_cast<int>(value)));
  END_HANDLE_TH_ERRORS
}

PyObject* finite_checks_deferred_on(PyObject*, PyObject* device) {
  HANDLE_TH_ERRORS
  const char* name = PyUnicode_AsUTF8(device);
  if (name == nullptr) return nullptr;
  return PyBool_FromLong(dtp_ext::deferred_on(c10::Device(std::string(name))));
  END_HANDLE_TH_ERRORS
}

PyObject* pending_non_finite(PyObject*, PyObject* device) {
  HANDLE_TH_ERRORS
  const char* name = PyUnicode_AsUTF8(device);
  if (name == nullptr) return nullptr;
  const auto flag = dtp_ext::pending_non_finite(c10::Device(std::string(name)));
  if (!flag.defined()) Py_RETURN_NONE;
  return THPVariable_Wrap(flag);
  END_HANDLE_TH_ERRORS
}

PyObject* clear_non_finite(PyObject*, PyObject* device) {
  HANDLE_TH_ERRORS
  const char* name = PyUnicode_AsUTF8(device);
  if (name == nullptr) return nullptr;
  dtp_ext::clear_non_finite(c10::Device(std::string(name)));
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

PyObject* non_finite_op(PyObject*, PyObject* code) {
  const long long value = PyLong_AsLongLong(code);
  if (value == -1 && PyErr_Occurred()) return nullptr;
  return PyUnicode_FromString(dtp_ext::non_finite_op(value).c_str());
}

PyObject* set_cpu_vector_kernels(PyObject*, PyObject* enabled) {
  const int value = PyObject_IsTrue(enabled);
  if (value < 0) return nullptr;
  return PyBool_FromLong(dtp_ext::set_vector_windows(value != 0));
}

PyObject* cpu_vector_kernels(PyObject*, PyObject*) {
  return PyBool_FromLong(dtp_ext::vector_windows_enabled());
}

PyObject* cpu_vector_windows(PyObject*, PyObject*) {
  return PyLong_FromLongLong(dtp_ext::vector_windows_written());
}

PyObject* last_kernel(PyObject*, PyObject*) {
  return PyUnicode_FromString(dtp_ext::last_kernel().c_str());
}

PyMethodDef methods[] = {
    {"defer_finite_checks", defer_finite_checks, METH_O,
     "Where finite checks are deferred: 0 CUDA only, 1 everywhere, 2 nowhere; returns the "
     "previous mode."},
    {"finite_checks_deferred_on", finite_checks_deferred_on, METH_O,
     "Whether a finite check on the device is deferred under the current mode."},
    {"pending_non_finite", pending_non_finite, METH_O,
     "The device's deferred non-finite flag (int32 0-d tensor, 0 or an op code), or None."},
    {"clear_non_finite", clear_non_finite, METH_O, "Resets the device's deferred flag to 0."},
    {"non_finite_op", non_finite_op, METH_O, "The op a deferred flag's code stands for."},
    {"last_kernel", last_kernel, METH_NOARGS,
     "The compiled kernel the dispatcher ran last on this thread, e.g. "
     "'dtp_ext::ldrl_feedback_loop[CPU]' ('' before any)."},
    {"build_info", build_info, METH_NOARGS, "What this build of dtp_ext._C contains."},
    {"set_finite_checks", set_finite_checks, METH_O,
     "Turns the fused ops' non-finite input checks on or off; returns the previous setting."},
    {"finite_checks", finite_checks, METH_NOARGS,
     "Whether the fused ops reject non-finite inputs."},
    {"set_cpu_vector_kernels", set_cpu_vector_kernels, METH_O,
     "Switches the CPU's AVX-512 pooled-window kernels on or off; returns the previous "
     "setting."},
    {"cpu_vector_windows", cpu_vector_windows, METH_NOARGS,
     "Pool windows the AVX-512 kernels have written since the library loaded."},
    {"cpu_vector_kernels", cpu_vector_kernels, METH_NOARGS,
     "Whether the CPU's pooled passes take the AVX-512 window kernels (the CPU has AVX-512 "
     "F/BW/VL and they are on)."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }

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
      "str activation, int pool) -> Tensor");
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
  // One SGD-momentum step on the feedback weight with the L-DRL gradient, in a single pass:
  // g = grad_scale * (reconstruction - noise) + weight_decay * V; buf = momentum * buf + g;
  // V -= lr * buf (torch.optim.SGD without dampening or Nesterov). weight and momentum_buffer
  // in one dense layout (contiguous or channels-last); an absent noise pairing is zero (the
  // reconstruction loss's plain gradient). Returns <V, reconstruction> - 2 <V, noise> for the V
  // before the step (B times the L-DRL loss; a reduction: float32 for a bfloat16/float16
  // weight), from what the pass reads anyway.
  m.def(
      "_sgd_ldrl_update(Tensor(a!) weight, Tensor(b!) momentum_buffer, "
      "Tensor reconstruction_pairing, Tensor? noise_pairing, float grad_scale, "
      "float weight_decay, float momentum, float lr) -> Tensor");
  // unpool(delta * phi'(output), indices): the vector-Jacobian product of pool(phi(.)) at the
  // block's own output, as a tensor of `out_sizes`.
  m.def(
      "_activation_pool_backward(str op, Tensor output, Tensor? indices, Tensor delta, "
      "int[] out_sizes, int pool, str activation) -> Tensor");
}
