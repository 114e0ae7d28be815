"""What the build contains: CPU kernels always; CUDA kernels where the build was asked to.

DTP_EXT_CUDA=1 (the one CUDA switch, set by CI and benchmarks/gpu_check.sh) makes the CUDA build
required here: its kernels registered, and its device code (read with cuobjdump) exactly the
machine code and PTX its recorded arch list promises.
"""

import glob
import os
import re
import shutil
import subprocess
import sys

import pytest

import dtp_ext
from dtp_ext import _C
from dtp_ext.build import kernel_image_for, parse_arch_list

REQUIRE_CUDA = os.environ.get("DTP_EXT_CUDA") == "1"
requires_cuda_build = pytest.mark.skipif(
    not REQUIRE_CUDA,
    reason="set DTP_EXT_CUDA=1 where the build must contain the CUDA kernels (CI, GPU check)",
)


def test_build_info_reports_versions_and_kernels():
    info = dtp_ext.build_info()
    for key in (
        "dtp_ext_version",
        "torch_version",
        "cpu_kernels",
        "cuda_built",
        "cuda_kernels",
        "cuda_arch_list",
        "cuda_sass_archs",
        "cuda_ptx_archs",
        "openmp",
    ):
        assert key in info
    assert info["openmp"], "built without OpenMP: at::parallel_for would run on one thread"
    if info["cuda_available"]:
        assert re.fullmatch(r"\d+\.\d+", info["cuda_device_capability"])
        assert "cuda_device_image" in info


def test_arch_list_parsing_and_which_gpus_can_run_it():
    assert parse_arch_list("9.0+PTX") == (["sm_90"], ["compute_90"])
    assert parse_arch_list("8.0;9.0a+PTX") == (["sm_80", "sm_90a"], ["compute_90a"])
    assert parse_arch_list("native GPU") == ([], [])
    sass, ptx = parse_arch_list("9.0+PTX")
    assert kernel_image_for((9, 0), sass, ptx) == "sm_90 machine code"
    assert kernel_image_for((10, 0), sass, ptx).startswith("compute_90 PTX")
    assert kernel_image_for((12, 0), sass, ptx).startswith("compute_90 PTX")
    assert kernel_image_for((8, 0), sass, ptx) is None
    # The old default, sm_90 machine code alone: every other GPU has no kernel image.
    assert kernel_image_for((10, 0), *parse_arch_list("9.0")) is None
    assert kernel_image_for((8, 6), *parse_arch_list("8.0;9.0+PTX")) == "sm_80 machine code"
    assert kernel_image_for((9, 0), *parse_arch_list("9.0a")) == "sm_90a machine code"
    assert kernel_image_for((10, 0), *parse_arch_list("9.0a+PTX")) is None


def find_cuobjdump():
    """cuobjdump from PATH, the toolkit, or the nvidia-cuda-cuobjdump wheel (CI installs it)."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    homes = [os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    candidates = [os.path.join(h, "bin", "cuobjdump") for h in homes if h]
    for entry in sys.path:
        candidates += sorted(glob.glob(os.path.join(entry, "nvidia", "*", "bin", "cuobjdump")))
    return next((c for c in candidates if os.access(c, os.X_OK)), None)


def fatbin_archs(cuobjdump, library):
    """(machine code archs, PTX archs) of the library's fatbin, e.g. (['sm_90'], ['compute_90'])."""
    archs = []
    for what in ("--list-elf", "--list-ptx"):
        done = subprocess.run([cuobjdump, what, library], capture_output=True, text=True)
        assert done.returncode == 0, f"{cuobjdump} {what}: {done.stderr}"
        # "ELF file    1: _C.1.sm_90.cubin" / "PTX file    1: _C.1.sm_90.ptx"
        archs.append(sorted(set(re.findall(r"\.(sm_\d+[a-z]?)\.(?:cubin|ptx)\b", done.stdout))))
    sass, ptx = archs
    return sass, [a.replace("sm_", "compute_") for a in ptx]


@requires_cuda_build
def test_cuda_kernels_were_compiled_into_the_library():
    info = dtp_ext.build_info()
    assert info["cuda_built"], "the library was built without its CUDA kernels"
    assert info["cuda_kernels"] == list(dtp_ext.ops.OP_NAMES)
    assert all(dtp_ext.ops.has_kernel(op, "CUDA") for op in dtp_ext.ops.PRIVATE_OP_NAMES)
    readelf = shutil.which("readelf")
    if readelf is not None:
        sections = subprocess.run(
            [readelf, "-SW", _C.__file__], capture_output=True, text=True
        ).stdout
        assert ".nv_fatbin" in sections, "no device code (.nv_fatbin) in the compiled library"


@requires_cuda_build
def test_fatbin_holds_the_machine_code_and_ptx_of_the_recorded_arch_list():
    """The device code is what build_info() says; built with no TORCH_CUDA_ARCH_LIST and no GPU
    (CI), that is sm_90 machine code and compute_90 PTX, so newer GPUs run it too."""
    info = dtp_ext.build_info()
    assert info["cuda_built"], "the library was built without its CUDA kernels"
    cuobjdump = find_cuobjdump()
    assert cuobjdump, (
        "DTP_EXT_CUDA=1 but cuobjdump was not found (PATH, $CUDA_HOME/bin or the "
        "nvidia-cuda-cuobjdump wheel): it reads the device code this test checks"
    )
    sass, ptx = fatbin_archs(cuobjdump, _C.__file__)
    assert info["cuda_sass_archs"], f"unreadable arch list {info['cuda_arch_list']!r}"
    assert (sass, ptx) == (sorted(info["cuda_sass_archs"]), sorted(info["cuda_ptx_archs"])), info[
        "cuda_arch_list"
    ]
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not info["cuda_available"]:
        assert info["cuda_arch_list"] == "9.0+PTX"
        assert (sass, ptx) == (["sm_90"], ["compute_90"])
