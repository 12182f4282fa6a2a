"""The index/unpack logic shared by the CUDA kernels (plugins/binary_mixed_linear/bml_unpack.h)
against the Python reference (qexport/ops/binary_mixed_linear/packing.py): compiled for the host with the C++ compiler,
called through ctypes. Needs no GPU and no nvcc. Exact comparisons (integers, bit patterns)."""
from __future__ import annotations

import ctypes
import pathlib
import shutil
import subprocess

import numpy as np
import pytest
import torch

from qexport.ops.binary_mixed_linear import packing
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


# ---- Tensor-core GEMM (bml_cuda.cu GemmTcKernel): fragment maps, dequant, whole-kernel emulation

def test_mma_fragment_layout(lib):
    """The m16n8k16 fragment maps against the PTX ISA table ("Matrix Fragments for
    mma.m16n8k16 with floating point type"), written out here independently, and each map a
    bijection onto its matrix."""
    a = np.zeros((32, 8, 2), dtype=np.int32)
    b = np.zeros((32, 4, 2), dtype=np.int32)
    c = np.zeros((32, 4, 2), dtype=np.int32)
    lib.qx_mma_layout(_p(a), _p(b), _p(c))
    for lane in range(32):
        group, tig = lane >> 2, lane % 4
        for i in range(8):  # a0..a7
            row = group if i in (0, 1, 4, 5) else group + 8
            col = tig * 2 + (i & 1) + (8 if i >= 4 else 0)
            assert tuple(a[lane, i]) == (row, col), (lane, i)
        for i in range(4):  # b0..b3 (row = k, col = n)
            row = tig * 2 + (i & 1) + (8 if i >= 2 else 0)
            assert tuple(b[lane, i]) == (row, group), (lane, i)
        for i in range(4):  # c0..c3
            row = group if i < 2 else group + 8
            assert tuple(c[lane, i]) == (row, tig * 2 + (i & 1)), (lane, i)
    for arr, shape in ((a, (16, 16)), (b, (16, 8)), (c, (16, 8))):
        seen = np.zeros(shape, dtype=np.int32)
        np.add.at(seen, (arr[..., 0].ravel(), arr[..., 1].ravel()), 1)
        assert (seen == 1).all()
    # A register r holds elements (2r, 2r+1): adjacent columns of one row (one 32-bit load).
    assert (a[:, 1::2, 0] == a[:, 0::2, 0]).all() and (a[:, 1::2, 1] == a[:, 0::2, 1] + 1).all()
    assert (b[:, 1::2, 0] == b[:, 0::2, 0] + 1).all() and (b[:, 1::2, 1] == b[:, 0::2, 1]).all()


def test_tc_tile_maps(lib):
    """Staging and warp maps: every tile element staged exactly once per K tile, the staged
    rows of a thread the same every tile, a warp's lanes on one row's consecutive columns, the
    row-sum pairs adjacent lanes covering each row once, and the warp sub-tiles covering the
    block tile."""
    geo = np.zeros(8, dtype=np.int32)
    lib.qx_tc_geometry(_p(geo))
    bm, bn, bk, threads, mi, nj, stride, iters = (int(v) for v in geo)
    assert bm * bk == threads * iters and stride >= bk + 8 and (stride // 2) % 2 == 0
    stage_row = np.zeros((threads, iters), dtype=np.int32)
    stage_col = np.zeros(threads, dtype=np.int32)
    rs_row = np.zeros(threads, dtype=np.int32)
    rs_col = np.zeros(threads, dtype=np.int32)
    warps = threads // 32
    w_row = np.zeros(warps, dtype=np.int32)
    w_col = np.zeros(warps, dtype=np.int32)
    lib.qx_tc_maps(_p(stage_row), _p(stage_col), _p(rs_row), _p(rs_col), _p(w_row), _p(w_col))
    seen = np.zeros((bm, bk), dtype=np.int32)
    np.add.at(seen, (stage_row.ravel(), np.repeat(stage_col, iters)), 1)
    assert (seen == 1).all()
    for w in range(warps):
        lanes = slice(32 * w, 32 * w + 32)
        assert (stage_row[lanes] == stage_row[32 * w]).all()
        np.testing.assert_array_equal(stage_col[lanes], np.arange(32) % bk)
    cover = np.zeros((bm, bk), dtype=np.int32)
    for t in range(threads):
        cover[rs_row[t], rs_col[t]:rs_col[t] + bk // 2] += 1
        assert rs_row[t] == rs_row[t ^ 1]
    assert (cover == 1).all()
    tile = np.zeros((bm, bn), dtype=np.int32)
    for w in range(warps):
        tile[w_row[w]:w_row[w] + 16 * mi, w_col[w]:w_col[w] + 8 * nj] += 1
    assert (tile == 1).all()
    # Fragment loads hit distinct bank quads: rows g = 0..7 at stride `stride` halves.
    words = (np.arange(8)[:, None] * (stride // 2) + np.arange(4)[None, :]) % 32
    assert len(set(words.ravel().tolist())) == 32


def test_binary_b_reg(lib):
    """B register of the binary part: the r2 pair with the half's sign flipped where the
    column's sign bit is 0, i.e. exactly sign * r2 in fp16, for every bit position pair."""
    rng = np.random.default_rng(0)
    count = 4096
    words = rng.integers(0, 2 ** 32, count, dtype=np.uint64).astype(np.uint32)
    kpos = (2 * rng.integers(0, 16, count)).astype(np.int32)
    r2 = rng.uniform(0.25, 4.0, (count, 2)).astype(np.float16)
    pairs = np.ascontiguousarray(r2).view(np.uint32).ravel()
    out = np.zeros(count, dtype=np.uint32)
    lib.qx_binary_b_reg(_p(words), _p(kpos), _p(pairs), I64(count), _p(out))
    got = out.view(np.float16).reshape(count, 2)
    bits = np.stack([(words >> kpos.astype(np.uint32)) & 1,
                     (words >> (kpos + 1).astype(np.uint32)) & 1], axis=1)
    want = np.where(bits == 1, r2, -r2).astype(np.float16)
    np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))


@pytest.mark.parametrize("n,k,frac,g", [(7, 13, 0.2, 2), (5, 100, 1.0, 32), (4, 1001, 0.3, 0),
                                        (2, 17, 0.5, 3)])
def test_salient_weights_half(lib, n, k, frac, g):
    s = int(round(frac * k))
    w = random_mixed_linear(n, k, s, g, seed=n * k)
    out = np.zeros((n, s), dtype=np.uint16)
    lib.qx_salient_weights_half(_p(w.salient_packed.numpy().copy()),
                                _p(w.salient_scale.numpy().view(np.uint16).copy()),
                                _p(w.salient_zero.numpy().copy()), I64(n), I64(s), I64(g), _p(out))
    gs = g if g > 0 else max(s, 1)
    gidx = np.arange(s) // gs
    codes = packing.unpack_nibbles(w.salient_packed, s).numpy().astype(np.float32)
    ref = ((codes - w.salient_zero.numpy()[:, gidx].astype(np.float32)) *
           w.salient_scale.numpy().astype(np.float32)[:, gidx]).astype(np.float16)
    np.testing.assert_array_equal(out, ref.view(np.uint16))


def test_sign_byte_predicate(lib):
    """Sign bytes past the row (padding of the last K tile) or past the last row read as 0 and
    are never loaded: the buffer here has 0xff beyond each row's 3 bytes."""
    n, sign_bytes = 3, 3
    buf = np.full((n + 1, 8), 0xFF, dtype=np.uint8)
    buf[:n, :sign_bytes] = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    packed = np.ascontiguousarray(buf[:, :sign_bytes]).copy()
    for o in range(n + 1):
        out = np.zeros(8, dtype=np.uint8)
        lib.qx_sign_bytes_or0(_p(packed), I64(o), I64(n), I64(sign_bytes), I64(8), _p(out))
        want = np.zeros(8, dtype=np.uint8)
        if o < n:
            want[:sign_bytes] = buf[o, :sign_bytes]
        np.testing.assert_array_equal(out, want)


def _tc_emulate(lib, w, x: np.ndarray) -> np.ndarray:
    """Runs qx_tc_emulate; each fp16 input is followed in memory by 64 NaN guards, so a read
    past any fp16 array (x, scales, r2) turns the result into NaN."""
    keep = []

    def p(t):
        if t is None:
            return None
        a = t.numpy() if isinstance(t, torch.Tensor) else t
        if a.dtype == np.float16:
            guarded = np.concatenate([np.ascontiguousarray(a).ravel(),
                                      np.full(64, np.nan, dtype=np.float16)])
            a = guarded.view(np.uint16)
        a = np.ascontiguousarray(a)
        keep.append(a)
        return _p(a)

    m = x.shape[0]
    y = np.zeros((m, w.out_features), dtype=np.float16)
    lib.qx_tc_emulate(I64(m), I64(w.in_features), I64(w.out_features),
                      I64(int(w.salient_idx.numel())), I64(w.salient_group_size), p(x),
                      p(w.sign_packed), p(w.row_scale), p(w.row_offset), p(w.salient_idx),
                      p(w.salient_packed), p(w.salient_scale), p(w.salient_zero), p(w.r2),
                      p(w.bias), _p(y.view(np.uint16)))
    return y


# (m, k, n, salient fraction, G): tails in M, N and K, K - S not a multiple of 8 or 16 or 32,
# S = 0, S = K, G odd / 0 / not dividing S, one tile exactly.
TC_EMU_CASES = [(5, 13, 7, 0.2, 2), (16, 8, 1, 0.0, 0), (64, 64, 64, 0.25, 16),
                (118, 77, 130, 0.5, 0), (1, 1000, 33, 1.0, 0), (65, 100, 65, 0.3, 3),
                (37, 37, 129, 0.0, 0), (256, 576, 96, 0.2, 32), (3, 1, 3, 1.0, 0),
                (70, 41, 70, 0.02, 0)]


@pytest.mark.parametrize("m,k,n,frac,g", TC_EMU_CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("with_r2", [False, True], ids=["no_r2", "r2"])
def test_tc_kernel_emulation_matches_reference(lib, m, k, n, frac, g, with_r2):
    """GemmTcKernel's algorithm, emulated on the host with the same index/dequant functions,
    against the PyTorch reference (fp16 tolerance of tests/test_gpu_kernels.py): catches wrong
    tiles, fragment maps, sign expansion, row sums, tails and epilogues without a GPU."""
    from qexport.ops.binary_mixed_linear import binary_mixed_linear_reference

    s = int(round(frac * k))
    w = random_mixed_linear(n, k, s, g, with_r2=with_r2, with_bias=bool(k % 2), seed=k + n + m)
    x = np.random.default_rng(m * 1000 + k).standard_normal((m, k)).astype(np.float16)
    y = _tc_emulate(lib, w, x)
    ref = binary_mixed_linear_reference(torch.from_numpy(x), *w.tensors(),
                                        **w.attributes()).float().numpy()
    scale = float(np.abs(ref).max()) or 1.0
    err = float(np.abs(y.astype(np.float32) - ref).max())
    assert err <= 2.0 ** -9 * scale, f"max abs error {err:.3g} vs output scale {scale:.3g}"
