"""Builds dtp_ext._C: the C++ kernels always, the CUDA kernels where nvcc and a CUDA build of
torch exist. Install with `pip install --no-build-isolation .` (build against the torch you run).

Environment:
  DTP_EXT_CUDA=0|1        the one CUDA switch: 0 builds the C++ (CPU) kernels only; 1 requires the
                          CUDA kernels (a missing nvcc or a CPU-only torch is an error, and the
                          tests then check the build's device code); unset: build them when nvcc
                          and a CUDA torch exist
  TORCH_CUDA_ARCH_LIST    CUDA archs to build, e.g. "9.0+PTX" or "8.0;9.0+PTX" (default: the
                          visible GPUs' archs with PTX for the newest; "9.0+PTX" when no GPU is
                          visible: sm_90 machine code for H100/H200, PTX that newer GPUs compile)
  CUDA_HOME               CUDA toolkit root (default: /usr/local/cuda, else found from nvcc)
  MAX_JOBS                parallel compile jobs (default: all cores)

The functions below have no side effects, so tests can import this file (under another module
name) and check them; only main(), run as a script or by pip, sets the environment and builds.
"""

import glob
import os
import re
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# sm_90 machine code for the H100/H200, plus compute_90 PTX that the driver compiles for newer
# GPUs (without it any other GPU fails with "no kernel image is available").
DEFAULT_ARCH_LIST = "9.0+PTX"
# Library headers that torch's CUDA headers include (ATen/cuda/CUDAContext.h) and a bare toolkit
# may lack; torch's `nvidia-*` wheels ship them under site-packages/nvidia/*/include.
LIBRARY_HEADERS = ("cublas_v2.h", "cublasLt.h", "cusparse.h", "cusolverDn.h")


def find_cuda_home():
    """The toolkit root: $CUDA_HOME, /usr/local/cuda, or two levels above the real nvcc."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for home in candidates:
        if (
            home
            and os.path.exists(os.path.join(home, "bin", "nvcc"))
            and os.path.exists(os.path.join(home, "include", "cuda_runtime.h"))
        ):
            return home
    return None


def cuda_switch(environ=os.environ):
    """DTP_EXT_CUDA: '0', '1' or None (unset or empty); anything else is an error."""
    value = environ.get("DTP_EXT_CUDA", "").strip()
    if value not in ("", "0", "1"):
        sys.exit(f"dtp_ext: DTP_EXT_CUDA must be 0 or 1 (or unset), not {value!r}")
    return value or None


def cuda_decision(switch, cuda_home, torch_cuda_version, torch_version):
    """(build_cuda, reason): decided once, explicitly; DTP_EXT_CUDA=1 makes a miss an error."""
    if switch == "0":
        return False, "DTP_EXT_CUDA=0"
    missing = []
    if cuda_home is None:
        missing.append("no nvcc / CUDA toolkit found")
    if torch_cuda_version is None:
        missing.append(f"torch {torch_version} is not a CUDA build")
    if missing and switch == "1":
        sys.exit("dtp_ext: DTP_EXT_CUDA=1 but " + "; ".join(missing))
    return (not missing), "; ".join(missing)


def wheel_include_dirs(cuda_home, search_paths=None):
    """The `nvidia` wheels' include folders that hold library headers the toolkit lacks; none
    when the toolkit has them all. Those folders also hold the runtime wheel's cuda_runtime.h,
    cuda_fp16.h, cuda_bf16.h, ..., which must not shadow the toolkit's (see wheel_include_flags)."""
    lacking = [
        h for h in LIBRARY_HEADERS if not os.path.exists(os.path.join(cuda_home, "include", h))
    ]
    if not lacking:
        return []
    found = []
    for entry in sys.path if search_paths is None else search_paths:
        for inc in sorted(glob.glob(os.path.join(entry, "nvidia", "*", "include"))):
            if any(os.path.exists(os.path.join(inc, h)) for h in lacking):
                found.append(os.path.realpath(inc))
    return list(dict.fromkeys(found))


def wheel_include_flags(cuda_home, search_paths=None):
    """Compiler flags that add wheel_include_dirs() *after* every -I folder and the system
    folders (`-idirafter`), so the toolkit's own headers win and only what it lacks comes from
    the wheels. nvcc has no -idirafter: it goes to the host compiler, which nvcc also runs to
    preprocess device code."""
    dirs = wheel_include_dirs(cuda_home, search_paths)
    for d in dirs:
        if "," in d:  # nvcc splits -Xcompiler values at commas
            sys.exit(f"dtp_ext: cannot pass an include folder with a comma to nvcc: {d}")
    return {
        "cxx": [flag for d in dirs for flag in ("-idirafter", d)],
        "nvcc": [f"-Xcompiler=-idirafter,{d}" for d in dirs],
    }


def canonical_arch_list(gencode_flags):
    """'-gencode=arch=compute_90,code=sm_90' (+ code=compute_90) -> '9.0+PTX'; several archs
    joined with ';' in ascending order: the TORCH_CUDA_ARCH_LIST that those flags build."""
    sass, ptx = set(), set()
    for flag in gencode_flags:
        m = re.search(r"arch=compute_(\d+)([a-z]?),code=(sm|compute)_(\d+)([a-z]?)", flag)
        if m:
            (sass if m.group(3) == "sm" else ptx).add((m.group(4), m.group(5)))

    def key(arch):
        return int(arch[0][:-1]), int(arch[0][-1]), arch[1]

    names = []
    for num, suffix in sorted(sass | ptx, key=key):
        name = f"{num[:-1]}.{num[-1]}{suffix}"
        if (num, suffix) not in sass:  # PTX alone: not expressible in TORCH_CUDA_ARCH_LIST
            raise ValueError(f"PTX without machine code for {name}: {gencode_flags}")
        names.append(name + ("+PTX" if (num, suffix) in ptx else ""))
    return ";".join(names)


def resolve_arch_list(requested, gpu_visible, arch_flags_for):
    """The arch list the build uses, canonical: the requested TORCH_CUDA_ARCH_LIST, else torch's
    choice for the visible GPUs, else DEFAULT_ARCH_LIST. arch_flags_for(list_or_None) returns
    torch's -gencode flags for that TORCH_CUDA_ARCH_LIST (None: ask the visible GPUs)."""
    requested = (requested or "").strip()
    if requested == "native" and not gpu_visible:
        sys.exit("dtp_ext: TORCH_CUDA_ARCH_LIST=native but no GPU is visible")
    if not requested and not gpu_visible:
        requested = DEFAULT_ARCH_LIST
    return canonical_arch_list(arch_flags_for(None if requested in ("", "native") else requested))


def torch_arch_flags(arch_list):
    """torch.utils.cpp_extension's own translation of TORCH_CUDA_ARCH_LIST into -gencode flags
    (named archs like 'Hopper' expanded, 'native'/unset read from the visible GPUs)."""
    from torch.utils import cpp_extension

    saved = os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
    try:
        if arch_list is not None:
            os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
        return cpp_extension._get_cuda_arch_flags()
    finally:
        os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        if saved is not None:
            os.environ["TORCH_CUDA_ARCH_LIST"] = saved


def cuda_library_dirs(cuda_home):
    """libcudart lives in $CUDA_HOME/lib64 (or lib, or targets/*/lib); torch's helper may not
    put that directory on the link line."""
    dirs = [os.path.join(cuda_home, d) for d in ("lib64", "lib")]
    dirs += glob.glob(os.path.join(cuda_home, "targets", "*", "lib"))
    return [d for d in dirs if glob.glob(os.path.join(d, "libcudart.so*"))]


def sources(suffix):
    return sorted(glob.glob(os.path.join("csrc", "**", "*" + suffix), recursive=True))


def make_extension(torch_version, cuda_home=None, arch_list=None, arch_flags=(), search_paths=None):
    """The extension: CPU kernels only when arch_list is None, else CPU and CUDA kernels for
    arch_list (canonical, see resolve_arch_list) with the toolkit in cuda_home. arch_flags are
    its -gencode flags, passed explicitly: torch adds none of its own when an nvcc flag contains
    'arch' (which a wheel's include folder could)."""
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    # The C++ standard comes from torch's helper. No fused multiply-adds formed by the compiler:
    # the scalar passes, their AVX-512 twins and the CUDA kernels must round each product the
    # same way (a build with FMA in its flags, -march=native, would fuse only some of them).
    cxx_flags = ["-O3", "-fopenmp", "-ffp-contract=off"]
    macros = [("DTP_TORCH_VERSION", f'"{torch_version}"')]
    if arch_list is None:
        return CppExtension(
            "dtp_ext._C",
            sources(".cpp"),
            define_macros=macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    includes = wheel_include_flags(cuda_home, search_paths)
    macros += [("DTP_WITH_CUDA", None), ("DTP_CUDA_ARCH_LIST", f'"{arch_list}"')]
    return CUDAExtension(
        "dtp_ext._C",
        sources(".cpp") + sources(".cu"),
        define_macros=macros,
        library_dirs=cuda_library_dirs(cuda_home),
        extra_compile_args={
            "cxx": cxx_flags + includes["cxx"],
            "nvcc": ["-O3"] + list(arch_flags) + includes["nvcc"],
        },
        extra_link_args=["-fopenmp"],
    )


def main():
    switch = cuda_switch()
    cuda_home = find_cuda_home() if switch != "0" else None
    if cuda_home:
        # torch.utils.cpp_extension reads CUDA_HOME once, at import.
        os.environ["CUDA_HOME"] = cuda_home
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))

    import torch
    from torch.utils.cpp_extension import BuildExtension

    build_cuda, reason = cuda_decision(switch, cuda_home, torch.version.cuda, torch.__version__)
    if build_cuda:
        arch_list = resolve_arch_list(
            os.environ.get("TORCH_CUDA_ARCH_LIST"), torch.cuda.is_available(), torch_arch_flags
        )
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
        arch_flags = torch_arch_flags(arch_list)  # what nvcc builds = what build_info() reports
        print(
            f"dtp_ext: building the C++ (CPU) and CUDA kernels for arch {arch_list} "
            f"(CUDA {torch.version.cuda}, toolkit {cuda_home})",
            flush=True,
        )
        ext = make_extension(torch.__version__, cuda_home, arch_list, arch_flags)
    else:
        print(f"dtp_ext: building the C++ (CPU) kernels only ({reason})", flush=True)
        ext = make_extension(torch.__version__)
    setup(
        packages=find_packages(include=["dtp_ext", "dtp_ext.*"]),
        ext_modules=[ext],
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    )


if __name__ == "__main__":
    main()
