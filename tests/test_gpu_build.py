"""CI without a GPU: the CUDA kernels, the ORT CUDA ops and the TensorRT plugin library compile
and link (tests/gpu_helpers.py builds them with nvcc), and everything that needs no GPU runs:
the plugin's C++ host tests (creator fields, parsing, serialization round trips, shapes,
formats), the library's exports and links, and the CPU kernel tests against the CUDA-enabled
op library (registering the CUDA-EP variants must not disturb the CPU ones)."""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys

import pytest

from gpu_helpers import ROOT, gpu_build
from qexport import contract as C


@pytest.fixture(scope="module")
def build():
    return gpu_build()


def test_trt_plugin_host_checks(build):
    proc = subprocess.run([str(build / "qexport_test_trt_plugin"), str(build / "libqexport_trt.so")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert " 0 failed" in proc.stdout


@pytest.mark.parametrize("name,exports", [
    ("libqexport_trt.so", {"getCreators", "setLoggerFinder", "qexport_contract_version"}),
    ("libqexport_ops.so", {"RegisterCustomOps", "qexport_contract_version"})])
def test_library_exports_and_links(build, name, exports):
    if not shutil.which("nm") or not shutil.which("readelf"):
        pytest.skip(reason="binutils (nm, readelf) not installed")
    lib = build / name
    out = subprocess.run(["nm", "-D", "--defined-only", str(lib)], capture_output=True,
                         text=True, check=True).stdout
    defined = {line.split()[-1] for line in out.splitlines() if line.split()[1:2] == ["T"]}
    assert defined == exports
    dyn = subprocess.run(["readelf", "-d", str(lib)], capture_output=True, text=True,
                         check=True).stdout
    needed = [line for line in dyn.splitlines() if "(NEEDED)" in line]
    for forbidden in ("nvinfer", "onnxruntime", "cudart", "libcuda."):
        assert not any(forbidden in line for line in needed), (forbidden, needed)


def test_trt_library_contract_version(build):
    lib = ctypes.CDLL(str(build / "libqexport_trt.so"))
    lib.qexport_contract_version.restype = ctypes.c_int
    assert lib.qexport_contract_version() == C.CONTRACT_VERSION


def test_cuda_enabled_ops_library_passes_cpu_tests(build):
    env = dict(os.environ, QEXPORT_OPS_LIBRARY=str(build / "libqexport_ops.so"))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                           str(ROOT / "tests" / "test_kernel_cpu.py")],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
