"""Builds dtp_ext._C: the C++ kernels always, the CUDA kernels where nvcc and a CUDA build of
torch exist. Install with `pip install --no-build-isolation .` (build against the torch you run).

Environment:
  DTP_EXT_CUDA=0|1        force a CPU-only build, or require the CUDA kernels (default: auto)
  TORCH_CUDA_ARCH_LIST    CUDA archs to build (default "9.0" when no GPU is visible)
  CUDA_HOME               CUDA toolkit root (default: /usr/local/cuda, else found from nvcc)
  MAX_JOBS                parallel compile jobs (default: all cores)
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def find_cuda_home():
    """The toolkit root: $CUDA_HOME, /usr/local/cuda, or two levels above the real nvcc."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for home in candidates:
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")) and os.path.exists(
            os.path.join(home, "include", "cuda_runtime.h")
        ):
            return home
    return None


CUDA_HOME = find_cuda_home()
if CUDA_HOME:
    # torch.utils.cpp_extension reads CUDA_HOME once, at import.
    os.environ["CUDA_HOME"] = CUDA_HOME
os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def cuda_decision():
    """(build_cuda, reason): decided once, explicitly; DTP_EXT_CUDA=1 makes a miss an error."""
    forced = os.environ.get("DTP_EXT_CUDA")
    if forced == "0":
        return False, "DTP_EXT_CUDA=0"
    missing = []
    if CUDA_HOME is None:
        missing.append("no nvcc / CUDA toolkit found")
    if torch.version.cuda is None:
        missing.append(f"torch {torch.__version__} is not a CUDA build")
    if missing and forced == "1":
        sys.exit("dtp_ext: DTP_EXT_CUDA=1 but " + "; ".join(missing))
    return (not missing), "; ".join(missing)


def nvidia_wheel_includes():
    """Headers that torch's CUDA headers include (cuBLAS, cuSPARSE, ...) but a bare toolkit may
    lack: the `nvidia` wheels installed with torch ship them under site-packages/nvidia."""
    found = []
    for entry in sys.path:
        for inc in sorted(glob.glob(os.path.join(entry, "nvidia", "*", "include"))):
            if os.path.exists(os.path.join(inc, "cublas_v2.h")) or os.path.exists(
                os.path.join(inc, "cusparse.h")
            ):
                found.append(inc)
    return list(dict.fromkeys(found))


def cuda_library_dirs():
    """libcudart lives in $CUDA_HOME/lib64 (or lib, or targets/*/lib); torch's helper may not
    put that directory on the link line."""
    dirs = [os.path.join(CUDA_HOME, d) for d in ("lib64", "lib")]
    dirs += glob.glob(os.path.join(CUDA_HOME, "targets", "*", "lib"))
    return [d for d in dirs if glob.glob(os.path.join(d, "libcudart.so*"))]


def extension():
    build_cuda, reason = cuda_decision()
    sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    cxx_flags = ["-O3", "-fopenmp"]  # the C++ standard comes from torch's helper
    macros = [("DTP_TORCH_VERSION", f'"{torch.__version__}"')]
    if not build_cuda:
        print(f"dtp_ext: building the C++ (CPU) kernels only ({reason})", flush=True)
        return CppExtension(
            "dtp_ext._C", sources, define_macros=macros,
            extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"],
        )
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"  # H100/H200; no GPU here to ask
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "native GPU")
    sources += sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
    macros += [("DTP_WITH_CUDA", None), ("DTP_CUDA_ARCH_LIST", f'"{archs}"')]
    print(
        f"dtp_ext: building the C++ (CPU) and CUDA kernels for arch {archs} "
        f"(CUDA {torch.version.cuda}, toolkit {CUDA_HOME})",
        flush=True,
    )
    return CUDAExtension(
        "dtp_ext._C", sources, define_macros=macros,
        include_dirs=nvidia_wheel_includes(), library_dirs=cuda_library_dirs(),
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
        extra_link_args=["-fopenmp"],
    )


setup(
    packages=find_packages(include=["dtp_ext", "dtp_ext.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
