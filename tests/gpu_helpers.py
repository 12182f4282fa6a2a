"""Helpers of the GPU-side tests (not a test module): one CMake build of the CUDA kernels, the
ORT CUDA ops, libqexport_trt.so and the C++ test programs, shared by tests/test_gpu_*.py.

The build lives in build/gpu-tests/ (gitignored, incremental: later runs rebuild only what
changed), or in $QEXPORT_GPU_BUILD_DIR. Architectures: $QEXPORT_CUDA_ARCHS, default "80" here
to keep CI compile time low (the library default is "80;86;89;90"). Needs nvcc and cmake, not a
GPU; without nvcc the tests that need the build skip, saying so."""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
_built: dict[str, pathlib.Path] = {}


def nvcc() -> str | None:
    found = os.environ.get("CUDACXX") or shutil.which("nvcc")
    if not found and pathlib.Path("/usr/local/cuda/bin/nvcc").is_file():
        found = "/usr/local/cuda/bin/nvcc"
    return found


def gpu_build() -> pathlib.Path:
    """Configure and build once per session; returns the build folder (skips without nvcc)."""
    if "dir" in _built:
        return _built["dir"]
    compiler = nvcc()
    if not compiler:
        pytest.skip(reason="nvcc not found (set CUDACXX or put nvcc on PATH): CUDA/TensorRT "
                           "sources cannot be compiled here")
    if not shutil.which("cmake"):
        pytest.skip(reason="cmake not found")
    build = pathlib.Path(os.environ.get("QEXPORT_GPU_BUILD_DIR", ROOT / "build" / "gpu-tests"))
    archs = os.environ.get("QEXPORT_CUDA_ARCHS", "80")
    configure = ["cmake", "-S", str(ROOT), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                 "-DQEXPORT_BUILD_CUDA=ON", "-DQEXPORT_BUILD_TRT=ON", "-DQEXPORT_BUILD_TESTS=ON",
                 f"-DCMAKE_CUDA_COMPILER={compiler}", f"-DCMAKE_CUDA_ARCHITECTURES={archs}"]
    jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", "2")
    for cmd in (configure, ["cmake", "--build", str(build), "-j", jobs]):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.fail(f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    _built["dir"] = build
    return build


def cuda_testlib():
    """ctypes handle of libqexport_cuda_testlib.so, or a skip when no CUDA GPU is usable."""
    import ctypes

    lib = ctypes.CDLL(str(gpu_build() / "libqexport_cuda_testlib.so"))
    lib.qx_cuda_device_count.restype = ctypes.c_int
    lib.qx_cuda_device_count.argtypes = [ctypes.c_char_p, ctypes.c_int64]
    err = ctypes.create_string_buffer(512)
    if lib.qx_cuda_device_count(err, 512) < 1:
        pytest.skip(reason=f"no CUDA GPU: {err.value.decode() or 'no device'}; the CUDA kernels "
                           "were compiled but not run")
    return lib
