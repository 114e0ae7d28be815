"""What the build contains: CPU kernels always; CUDA kernels where the build was asked to."""
import os
import shutil
import subprocess

import pytest

import dtp_ext
from dtp_ext import _C


def test_build_info_reports_versions_and_kernels():
    info = dtp_ext.build_info()
    for key in ("dtp_ext_version", "torch_version", "cpu_kernels", "cuda_built", "cuda_kernels",
                "cuda_arch_list", "openmp"):
        assert key in info
    assert info["openmp"], "built without OpenMP: at::parallel_for would run on one thread"


@pytest.mark.skipif(os.environ.get("DTP_EXT_EXPECT_CUDA_BUILD") != "1",
                    reason="set DTP_EXT_EXPECT_CUDA_BUILD=1 where the build must contain CUDA kernels (CI)")
def test_cuda_kernels_were_compiled_into_the_library():
    info = dtp_ext.build_info()
    assert info["cuda_built"], "the library was built without its CUDA kernels"
    assert info["cuda_kernels"] == list(dtp_ext.ops.OP_NAMES)
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("readelf not installed")
    sections = subprocess.run([readelf, "-SW", _C.__file__], capture_output=True, text=True).stdout
    assert ".nv_fatbin" in sections, "no device code (.nv_fatbin) in the compiled library"
