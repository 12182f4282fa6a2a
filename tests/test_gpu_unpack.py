"""The index/unpack logic shared by the CUDA kernels (plugins/binary_mixed_linear/bml_unpack.h)
against the Python reference (qexport/packing.py): compiled for the host with the C++ compiler,
called through ctypes. Needs no GPU and no nvcc. Exact comparisons (integers, bit patterns)."""
from __future__ import annotations

import ctypes
import pathlib
import shutil
import subprocess

import numpy as np
import pytest
import torch

from qexport import packing
from qexport.testing import random_mixed_linear

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if not cxx:
        pytest.skip(reason="no C++ compiler (c++, g++ or clang++) on PATH")
    out = tmp_path_factory.mktemp("unpack") / "libunpack.so"
    subprocess.run([cxx, "-std=c++17", "-O1", "-shared", "-fPIC", "-Wall", "-Wextra", "-Werror",
                    f"-I{ROOT / 'plugins'}", str(ROOT / "tests" / "cpp" / "unpack_capi.cpp"),
                    "-o", str(out)], check=True)
    return ctypes.CDLL(str(out))


def _p(a: np.ndarray):
    return a.ctypes.data_as(ctypes.c_void_p)


I64 = ctypes.c_int64


@pytest.mark.parametrize("k,s", [(1, 0), (1, 1), (8, 0), (13, 3), (13, 13), (64, 1), (1000, 200),
                                 (577, 576)])
def test_binary_channels(lib, k, s):
    for seed in range(3):
        idx = torch.randperm(k, generator=torch.Generator().manual_seed(seed))[:s].sort().values
        idx = idx.to(torch.int32).numpy().copy()
        out = np.zeros(k - s, dtype=np.int64)
        lib.qx_binary_channels(_p(idx), I64(s), I64(k), _p(out))
        ref = packing.binary_channels(k, torch.from_numpy(idx)).numpy()
        np.testing.assert_array_equal(out, ref)


def test_binary_channels_edges(lib):
    """Salient channels at both ends and in runs."""
    k = 20
    idx = np.array([0, 1, 2, 7, 8, 18, 19], dtype=np.int32)
    out = np.zeros(k - idx.size, dtype=np.int64)
    lib.qx_binary_channels(_p(idx), I64(idx.size), I64(k), _p(out))
    np.testing.assert_array_equal(out, [3, 4, 5, 6, 9, 10, 11, 12, 13, 14, 15, 16, 17])


@pytest.mark.parametrize("n,k,frac,g", [(7, 13, 0.2, 2), (3, 64, 0.0, 0), (5, 100, 1.0, 32),
                                        (4, 1001, 0.3, 0), (2, 17, 0.5, 4)])
def test_signs_nibbles_groups_weights(lib, n, k, frac, g):
    s = int(round(frac * k))
    w = random_mixed_linear(n, k, s, g, seed=n + k)
    kb = k - s
    sign = w.sign_packed.numpy().copy()
    out = np.zeros((n, kb), dtype=np.float32)
    lib.qx_unpack_signs(_p(sign), I64(n), I64(kb), _p(out))
    np.testing.assert_array_equal(out, packing.unpack_signs(w.sign_packed, kb).numpy())

    packed = w.salient_packed.numpy().copy()
    codes = np.zeros((n, s), dtype=np.int32)
    lib.qx_unpack_nibbles(_p(packed), I64(n), I64(s), _p(codes))
    np.testing.assert_array_equal(codes, packing.unpack_nibbles(w.salient_packed, s).numpy())

    group_of = np.zeros(max(s, 1), dtype=np.int64)
    lib.qx_groups.restype = ctypes.c_int64
    groups = lib.qx_groups(I64(s), I64(g), _p(group_of))
    assert groups == packing.num_groups(s, g)
    gs = g if g > 0 else max(s, 1)
    np.testing.assert_array_equal(group_of[:s], np.arange(s) // gs)

    scale = w.salient_scale.numpy().view(np.uint16).copy()
    zero = w.salient_zero.numpy().copy()
    wts = np.zeros((n, s), dtype=np.float32)
    lib.qx_salient_weights(_p(packed), _p(scale), _p(zero), I64(n), I64(s), I64(g), _p(wts))
    if s:
        gidx = np.arange(s) // gs
        ref = ((codes - zero[:, gidx].astype(np.float32)) *
               w.salient_scale.numpy().astype(np.float32)[:, gidx])
        np.testing.assert_array_equal(wts, ref.astype(np.float32))


def test_half_conversions(lib):
    every = np.arange(65536, dtype=np.uint16)
    out = np.zeros(65536, dtype=np.float32)
    lib.qx_half_to_float(_p(every), I64(every.size), _p(out))
    ref = every.view(np.float16).astype(np.float32)
    np.testing.assert_array_equal(out.view(np.uint32)[~np.isnan(ref)],
                                  ref.view(np.uint32)[~np.isnan(ref)])
    assert np.isnan(out[np.isnan(ref)]).all()

    rng = np.random.default_rng(0)
    f = np.concatenate([
        rng.standard_normal(20000).astype(np.float32) * 10.0 ** rng.integers(-9, 6, 20000),
        np.arange(1, 2000, dtype=np.float32) * np.float32(2.0 ** -25),
        np.float32([65504, 65519.99, 65520, 1e9, -65520, 2.0 ** -24, 2.0 ** -25, 0.0, -0.0,
                    1 + 2.0 ** -11, 1 + 3 * 2.0 ** -11, np.inf, -np.inf])]).astype(np.float32)
    h = np.zeros(f.size, dtype=np.uint16)
    lib.qx_float_to_half(_p(f), I64(f.size), _p(h))
    np.testing.assert_array_equal(h, f.astype(np.float16).view(np.uint16))
