"""The CUDA kernels (GEMV, SIMT GEMM and tensor-core GEMM paths, fp32 and fp16) vs the PyTorch
reference, and the ORT CUDA execution provider vs the CPU one. Need a CUDA GPU: without one
they skip, saying why.

Tolerances (max abs error relative to max|ref|), as for the CPU kernel: fp32 1e-4 (fp32
accumulation in a different order; the GEMM path folds row_scale*sign + row_offset into one
weight), fp16 2^-9 (one rounding of the fp32 result to fp16, 1 ulp either way; the
tensor-core path also rounds each salient weight (q - zero) * scale to fp16 once, which the
host emulation in tests/test_gpu_unpack.py shows stays well inside it)."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch

from gpu_helpers import cuda_testlib
from qexport.ops.binary_mixed_linear import binary_mixed_linear_reference
from qexport.ops.binary_mixed_linear.packing import num_groups
from qexport.testing import random_mixed_linear

TOL = {np.float32: 1e-4, np.float16: 2.0 ** -9}


@pytest.fixture(scope="module")
def lib():
    return cuda_testlib()


def run_cuda(lib, w, x: np.ndarray, path: int, repeat: int = 1):
    """Runs the launchers on host arrays; returns (y, validation flags, ms per launch)."""
    def p(t):
        if t is None:
            return None
        a = t.numpy() if isinstance(t, torch.Tensor) else t
        if a.dtype == np.float16:
            a = a.view(np.uint16)
        a = np.ascontiguousarray(a)
        keep.append(a)
        return a.ctypes.data_as(ctypes.c_void_p)

    keep: list = []
    m = x.shape[0]
    y = np.zeros((m, w.out_features), dtype=x.dtype)
    flags = np.zeros(1, dtype=np.int32)
    ms = ctypes.c_float(0.0)
    err = ctypes.create_string_buffer(1024)
    s = int(w.salient_idx.numel())
    i64 = ctypes.c_int64
    rc = lib.qx_bml_cuda_run(
        i64(m), i64(w.in_features), i64(w.out_features), i64(s), i64(w.salient_group_size),
        ctypes.c_int(1 if x.dtype == np.float16 else 0), ctypes.c_int(path), p(x),
        y.ctypes.data_as(ctypes.c_void_p), p(w.sign_packed), p(w.row_scale), p(w.row_offset),
        p(w.salient_idx), p(w.salient_packed), p(w.salient_scale), p(w.salient_zero), p(w.r2),
        p(w.bias), flags.ctypes.data_as(ctypes.c_void_p), ctypes.c_int(repeat),
        ctypes.byref(ms), err, i64(1024))
    if rc != 0:
        raise RuntimeError(err.value.decode())
    return y, int(flags[0]), ms.value


def _close(y, ref, tol):
    scale = float(np.abs(ref.astype(np.float32)).max()) or 1.0
    err = float(np.abs(y.astype(np.float32) - ref.astype(np.float32)).max())
    assert err <= tol * scale, f"max abs error {err:.3g} > {tol:.3g} * output scale {scale:.3g}"


CASES = [(m, k, n, frac, g) for m in (1, 3, 4, 5, 118) for (k, n, frac, g) in
         [(8, 1, 0.0, 0), (13, 7, 0.2, 2), (576, 64, 0.2, 32), (1000, 33, 1.0, 0),
          (4096, 256, 0.2, 128), (77, 130, 0.5, 0)]]


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("path", [1, 2], ids=["gemv", "gemm"])
@pytest.mark.parametrize("m,k,n,frac,g", CASES, ids=lambda v: str(v))
def test_matches_reference(lib, m, k, n, frac, g, path, dtype):
    if path == 1 and m > 4:
        pytest.skip(reason="the GEMV path takes M <= 4 (kGemvMaxM)")
    w = random_mixed_linear(n, k, int(round(frac * k)), g, with_r2=bool(m % 2),
                            with_bias=bool(k % 2), seed=k + n)
    x = np.random.default_rng(m * 1000 + k).standard_normal((m, k)).astype(dtype)
    y, flags, _ = run_cuda(lib, w, x, path)
    assert flags == 0
    ref = binary_mixed_linear_reference(torch.from_numpy(x), *w.tensors(), **w.attributes())
    _close(y, ref.numpy(), TOL[dtype])


TC_CASES = [(m, k, n, frac, g) for m in (1, 5, 16, 118, 256) for (k, n, frac, g) in
            [(8, 1, 0.0, 0), (13, 7, 0.2, 2), (37, 129, 0.0, 0), (100, 65, 0.3, 3),
             (576, 64, 0.2, 32), (1000, 33, 1.0, 0), (4096, 256, 0.2, 128), (77, 130, 0.5, 0),
             (1001, 200, 0.02, 0)]]


def _need_tensor_cores(lib):
    lib.qx_cuda_compute_capability.restype = ctypes.c_int
    cc = lib.qx_cuda_compute_capability()
    if cc < 80:
        pytest.skip(reason=f"the tensor-core path needs compute capability >= 8.0 (device: {cc})")


@pytest.mark.parametrize("with_r2", [False, True], ids=["no_r2", "r2"])
@pytest.mark.parametrize("m,k,n,frac,g", TC_CASES, ids=lambda v: str(v))
def test_tensor_core_path_matches_reference(lib, m, k, n, frac, g, with_r2):
    """Path 3 (mma.sync m16n8k16, fp16 activations): tails in M, N, K; K - S not a multiple of
    8/16/32; S = 0 and S = K; odd G; with and without r2 and bias."""
    _need_tensor_cores(lib)
    w = random_mixed_linear(n, k, int(round(frac * k)), g, with_r2=with_r2,
                            with_bias=bool(k % 2), seed=k + n + m)
    x = np.random.default_rng(m * 1000 + k).standard_normal((m, k)).astype(np.float16)
    y, flags, _ = run_cuda(lib, w, x, 3)
    assert flags == 0
    ref = binary_mixed_linear_reference(torch.from_numpy(x), *w.tensors(), **w.attributes())
    _close(y, ref.numpy(), TOL[np.float16])
    if m > 4:  # kAuto takes the tensor-core path here: same result
        y_auto, _, _ = run_cuda(lib, w, x, 0)
        np.testing.assert_array_equal(y_auto.view(np.uint16), y.view(np.uint16))


def test_tensor_core_path_large_values(lib):
    """Large activations (|x| up to ~8000, outputs ~11000): the products sign*r2*x and the row
    sums of x*r2 stay in fp32 (nothing intermediate is rounded to fp16), so no overflow."""
    _need_tensor_cores(lib)
    w = random_mixed_linear(96, 512, 100, 64, with_r2=True, with_bias=True, seed=5)
    x = (np.random.default_rng(5).standard_normal((40, 512)) * 2000).astype(np.float16)
    y, _, _ = run_cuda(lib, w, x, 3)
    ref = binary_mixed_linear_reference(torch.from_numpy(x).float(), *w.tensors(),
                                        **w.attributes()).numpy()
    assert np.abs(ref).max() < 60000
    assert np.isfinite(y.astype(np.float32)).all()
    _close(y, ref, TOL[np.float16])


def test_auto_dispatch(lib):
    """kAuto: GEMV for M <= 4, the tensor-core GEMM for fp16 above it on sm_80+, else SIMT."""
    lib.qx_bml_cuda_auto_path.restype = ctypes.c_char_p
    lib.qx_cuda_compute_capability.restype = ctypes.c_int
    tc = lib.qx_cuda_compute_capability() >= 80
    i64 = ctypes.c_int64

    def auto(m, act):
        return lib.qx_bml_cuda_auto_path(i64(m), i64(4096), i64(4096), i64(819), i64(128),
                                         ctypes.c_int(act)).decode()
    assert auto(4, 1) == "gemv" and auto(4, 0) == "gemv"
    assert auto(5, 0) == "gemm" and auto(256, 0) == "gemm"
    assert auto(5, 1) == auto(256, 1) == ("gemm_tc" if tc else "gemm")


def test_tensor_core_path_rejects_fp32(lib):
    w = random_mixed_linear(8, 32, 4, 0, seed=3)
    x = np.ones((8, 32), dtype=np.float32)
    with pytest.raises(RuntimeError, match="tensor-core path takes fp16"):
        run_cuda(lib, w, x, 3)


def test_prepare_flags_bad_weights(lib):
    w = random_mixed_linear(4, 16, 4, 0, seed=1)
    x = np.ones((1, 16), dtype=np.float32)
    w.salient_idx[:] = torch.tensor([3, 3, 20, -1], dtype=torch.int32)
    w.salient_zero[0, 0] = 16
    _, flags, _ = run_cuda(lib, w, x, 0)  # must not fault: indices are clamped
    assert flags == 1 | 2 | 4


def test_ort_cuda_provider_matches_cpu(tmp_path):
    """Same model through CUDAExecutionProvider and CPUExecutionProvider (needs onnxruntime-gpu,
    a CUDA GPU and the op library built with QEXPORT_BUILD_CUDA=ON)."""
    import onnxruntime as ort

    from gpu_helpers import gpu_build
    from native_helpers import bml_model
    from qexport import native

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip(reason="onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu "
                           "instead of onnxruntime, on a machine with a CUDA GPU)")
    cuda_testlib()  # skips without a GPU
    lib_path = gpu_build() / "libqexport_ops.so"
    for dtype in (np.float32, np.float16):
        w = random_mixed_linear(96, 200, 40, 16, with_r2=True, with_bias=True, seed=2)
        model = bml_model(w, ["M", 200], dtype).SerializeToString()
        x = np.random.default_rng(0).standard_normal((6, 200)).astype(dtype)
        outs = []
        for providers in (["CUDAExecutionProvider"], ["CPUExecutionProvider"]):
            sess = ort.InferenceSession(model, sess_options=native.session_options(lib_path),
                                        providers=providers)
            assert sess.get_providers()[0] == providers[0]
            outs.append(sess.run(None, {"X": x})[0])
        _close(outs[0], outs[1], TOL[dtype])
        assert num_groups(40, 16) == 3
