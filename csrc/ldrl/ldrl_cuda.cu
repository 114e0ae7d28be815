// CUDA registration of the L-DRL ops: the shared algorithm (ldrl_ops.cpp) with the CUDA
// elementwise kernels; the big products run through ATen (cuBLAS/cuDNN) on the current stream.
#include "register_ops.h"

TORCH_LIBRARY_IMPL(dtp_ext, CUDA, m) {
  dtp_ext::BoundOps<&dtp_ext::kCudaKernels>::register_all(m);
}
