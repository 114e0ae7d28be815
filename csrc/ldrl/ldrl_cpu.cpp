// CPU registration of the L-DRL ops.
#include "register_ops.h"

TORCH_LIBRARY_IMPL(dtp_ext, CPU, m) {
  dtp_ext::BoundOps<&dtp_ext::kCpuKernels>::register_all(m);
}
