"""The CPU kernel of qexport::BinaryMixedLinear in ONNX Runtime vs the PyTorch reference.

Every result test runs on each CPU path the machine has (QEXPORT_CPU_ISA=portable, avx2,
avx512; a path the CPU lacks is skipped with the reason), single- and multi-threaded. The
large-M tests also force each algorithm (QEXPORT_CPU_ALGO=tables, gemm), since the automatic
choice between the lookup tables and the dequantize + GEMM path depends on M, N and the path.

Tolerances (max abs error over the output, relative to the output scale max|ref|):
- fp32 activations: 1e-4 * max|ref| (both sides accumulate in fp32, in different orders; the
  AVX-512 path's tables hold 23-bit integers, docs/kernels.md: its largest error over these
  cases is 3.5e-6 * max|ref|);
- fp16 activations: 2^-9 * max|ref| (both sides compute in fp32 from the same fp16 inputs and
  round once to fp16; summation order can move a result across a rounding boundary: 1 ulp).
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from native_helpers import (ISAS, bml_model, missing_isa_flags, ort_errors, ort_session,
                            require_library)
from qexport.ops.binary_mixed_linear import contract as B
from qexport.ops import reference_evaluator_ops
from qexport.ops.binary_mixed_linear import binary_mixed_linear_reference
from qexport.testing import random_mixed_linear

FP32_RTOL = 1e-4
FP16_RTOL = 2.0 ** -9


@pytest.fixture(scope="module")
def lib():
    return require_library()


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    """Forces one CPU path (read by the library when a session creates the kernel)."""
    missing = missing_isa_flags(request.param)
    if missing:
        pytest.skip(f"CPU lacks {', '.join(missing)} for the {request.param} path")
    monkeypatch.setenv("QEXPORT_CPU_ISA", request.param)
    return request.param


ALGOS = ("tables", "gemm")


@pytest.fixture(params=ALGOS)
def algo(request, isa, monkeypatch):
    """Forces the lookup tables or the dequantize + GEMM path (the portable path has no GEMM)."""
    if request.param == "gemm" and isa == "portable":
        pytest.skip("the portable path has no GEMM (its tables serve every M)")
    monkeypatch.setenv("QEXPORT_CPU_ALGO", request.param)
    return request.param


def _session(model, library, threads=1):
    import onnxruntime as ort

    from qexport import native

    options = native.session_options(library)
    options.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), sess_options=options,
                                providers=["CPUExecutionProvider"])


def _reference(w, x: np.ndarray) -> np.ndarray:
    y = binary_mixed_linear_reference(torch.from_numpy(x), *w.tensors(), **w.attributes())
    return y.numpy()


def _assert_close(y: np.ndarray, ref: np.ndarray, rtol: float) -> None:
    assert y.shape == ref.shape and y.dtype == ref.dtype
    if ref.size == 0:
        return
    scale = float(np.abs(ref.astype(np.float32)).max()) or 1.0
    err = float(np.abs(y.astype(np.float32) - ref.astype(np.float32)).max())
    assert err <= rtol * scale, f"max abs error {err:.3g} > {rtol:.3g} * output scale {scale:.3g}"


def _weights(n, k, frac, g, r2, bias, seed=0):
    return random_mixed_linear(n, k, int(round(frac * k)), g, with_r2=r2, with_bias=bias,
                               seed=seed)


# K x salient fraction x group size in full; M, N, r2 and bias cycle through their values so
# each appears with every K (24 cases, ~a second in all).
_CASES = []
for i, (k, frac, g) in enumerate(itertools.product((8, 13, 576, 1000), (0.0, 0.2, 1.0), (0, 32))):
    m, n = (1, 3, 118)[i % 3], (1, 7, 64)[(i // 3) % 3]
    r2, bias = bool(i % 2), bool((i // 2) % 2)
    _CASES.append(pytest.param(m, k, n, frac, g, r2, bias,
                               id=f"M{m}-K{k}-N{n}-s{frac}-G{g}{'-r2' if r2 else ''}"
                                  f"{'-bias' if bias else ''}"))


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("m,k,n,frac,g,r2,bias", _CASES)
def test_matches_reference(lib, isa, m, k, n, frac, g, r2, bias, dtype):
    w = _weights(n, k, frac, g, r2, bias, seed=k + n)
    sess = ort_session(bml_model(w, ["M", k], dtype), lib)
    x = np.random.default_rng(m * 1000 + k).standard_normal((m, k)).astype(dtype)
    (y,) = sess.run(None, {"X": x})
    _assert_close(y, _reference(w, x), FP32_RTOL if dtype == np.float32 else FP16_RTOL)


@pytest.mark.parametrize("k,frac", [(132_000, 0.0), (33_000, 1.0)], ids=["binary", "salient"])
def test_long_rows(lib, isa, k, frac):
    """Rows of more than 4096 packed dwords: the AVX-512 lookup sums them in int32 a part at a
    time (kSumDw), so that no sum can overflow."""
    w = _weights(16, k, frac, 0, False, False, seed=13)
    x = np.random.default_rng(14).standard_normal((1, k)).astype(np.float32)
    sess = ort_session(bml_model(w, ["M", k]), lib)
    _assert_close(sess.run(None, {"X": x})[0], _reference(w, x), FP32_RTOL)


@pytest.mark.parametrize("kind", ["binary", "salient"])
def test_outlier_activations(lib, isa, kind):
    """LLM activations have channels far above the rest ("massive activations"). The AVX-512
    tables scale each section to its largest entry (docs/kernels.md), so an outlier sets the
    step for every other channel's entries: 16-bit entries missed by 3x and 6x here."""
    w = _weights(256, 1024, 0.2, 0, False, False, seed=11)
    salient = set(w.salient_idx.tolist())
    channels = [c for c in range(1024) if (c in salient) == (kind == "salient")]
    x = np.random.default_rng(12).standard_normal((3, 1024)).astype(np.float32)
    x[:, channels[:2]] = [3000.0, -2000.0]
    sess = ort_session(bml_model(w, ["M", 1024]), lib)
    _assert_close(sess.run(None, {"X": x})[0], _reference(w, x), FP32_RTOL)


@pytest.mark.parametrize("shape", [(13,), (5, 13), (2, 5, 13), (2, 3, 5, 13), (0, 13), (2, 0, 13)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["fp32", "fp16"])
def test_leading_dims(lib, isa, shape, dtype):
    w = _weights(7, 13, 0.2, 2, True, True, seed=3)
    dims = [f"d{i}" for i in range(len(shape) - 1)] + [13]
    sess = ort_session(bml_model(w, dims, dtype), lib)
    x = np.random.default_rng(1).standard_normal(shape).astype(dtype)
    (y,) = sess.run(None, {"X": x})
    assert y.shape == shape[:-1] + (7,)
    _assert_close(y, _reference(w, x), FP32_RTOL if dtype == np.float32 else FP16_RTOL)


def test_fp16_special_values(lib, isa):
    """Large inputs overflow to inf in fp16 exactly as the reference's cast does."""
    w = _weights(4, 16, 0.0, 0, False, False, seed=5)
    sess = ort_session(bml_model(w, ["M", 16], np.float16), lib)
    x = np.full((2, 16), 60000.0, dtype=np.float16)
    x[1] = np.float16(1e-7)  # subnormal inputs
    (y,) = sess.run(None, {"X": x})
    ref = _reference(w, x)
    np.testing.assert_array_equal(np.isinf(y), np.isinf(ref))
    _assert_close(y[1:], ref[1:], FP16_RTOL)


def test_fp16_conversions_exact(lib, isa):
    """The kernel's own IEEE half<->float helpers round like numpy (to nearest even).

    One salient channel with code 1, zero 0, scale 1 makes y = x + bias: every fp16 value
    through X checks half->float->half; fp32 biases with x = 0 check float->half rounding
    (ties, subnormals, overflow to inf)."""
    from qexport.ops.binary_mixed_linear.packing import MixedLinearWeights

    rng = np.random.default_rng(7)
    bias = np.concatenate([
        rng.standard_normal(2000).astype(np.float32) * 10.0 ** rng.integers(-9, 6, 2000),
        (np.arange(1, 1000, dtype=np.float32) * np.float32(2.0 ** -25)),  # subnormal ties
        np.float32([65504, 65519.99, 65520, 1e9, -65520, 2.0 ** -24, 2.0 ** -25,
                    1 + 2.0 ** -11, 1 + 3 * 2.0 ** -11, np.inf, -np.inf, 0.0])]).astype(np.float32)
    n = bias.size

    def t(a, dtype):
        return torch.tensor(a, dtype=dtype)

    w = MixedLinearWeights(
        in_features=1, out_features=n, salient_group_size=0,
        sign_packed=torch.zeros(n, 0, dtype=torch.uint8),
        row_scale=torch.zeros(n, dtype=torch.float16), row_offset=torch.zeros(n, dtype=torch.float16),
        salient_idx=t([0], torch.int32), salient_packed=torch.ones(n, 1, dtype=torch.uint8),
        salient_scale=torch.ones(n, 1, dtype=torch.float16),
        salient_zero=torch.zeros(n, 1, dtype=torch.uint8), bias=torch.from_numpy(bias))
    w.validate()
    sess = ort_session(bml_model(w, ["M", 1], np.float16), lib)
    (y,) = sess.run(None, {"X": np.zeros((1, 1), np.float16)})
    with np.errstate(over="ignore"):
        expect = bias.astype(np.float16)
    np.testing.assert_array_equal(y[0].view(np.uint16), expect.view(np.uint16))

    w.bias = None
    w.out_features = 1
    for name in ("sign_packed", "row_scale", "row_offset", "salient_packed", "salient_scale",
                 "salient_zero"):
        setattr(w, name, getattr(w, name)[:1])
    sess = ort_session(bml_model(w, ["M", 1], np.float16), lib)
    halves = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    finite_or_inf = ~np.isnan(halves)
    (y,) = sess.run(None, {"X": halves[:, None]})
    ref = _reference(w, halves[:, None])  # x itself, but -0 -> +0 (0 + -0 in fp32)
    np.testing.assert_array_equal(ref[finite_or_inf, 0], halves[finite_or_inf])
    np.testing.assert_array_equal(y[finite_or_inf, 0].view(np.uint16),
                                  ref[finite_or_inf, 0].view(np.uint16))
    assert np.isnan(y[~finite_or_inf, 0]).all()


@pytest.mark.parametrize("frac,g,r2,bias", [(0.2, 32, True, True), (0.0, 0, False, False),
                                            (1.0, 0, False, True)],
                         ids=["mixed", "w1", "w4"])
def test_reference_evaluator_agrees(lib, isa, frac, g, r2, bias):
    """The same model through onnx's ReferenceEvaluator (ops.py OpRun), torch and ORT."""
    from onnx.reference import ReferenceEvaluator

    w = _weights(9, 70, frac, g, r2, bias, seed=11)
    model = bml_model(w, ["B", "T", 70])
    x = np.random.default_rng(2).standard_normal((2, 3, 70)).astype(np.float32)
    (y_ref_eval,) = ReferenceEvaluator(model, new_ops=reference_evaluator_ops()).run(None, {"X": x})
    ref = _reference(w, x)
    np.testing.assert_allclose(y_ref_eval, ref, rtol=0, atol=1e-6)
    (y_ort,) = ort_session(model, lib).run(None, {"X": x})
    _assert_close(y_ort, ref, FP32_RTOL)


# Random shapes from a fixed seed list: M (up to the large-M tiles and several passes over
# the rows of X), K, N, salient count and group size (odd ones too), r2, bias, dtype, threads.
_RANDOM_SEEDS = list(range(12))


def _random_case(seed):
    r = np.random.default_rng(1000 + seed)
    m = int(r.choice([1, 2, 5, 17, 64, 256, int(r.integers(1, 300))]))
    k = int(r.integers(1, 700))
    n = int(r.integers(1, 150))
    s = int(r.integers(0, k + 1)) if r.random() < 0.3 else int(round(k * r.uniform(0, 0.4)))
    g = int(r.choice([0, 1, 2, 3, 5, 8, 32, 64, 128]))
    return m, k, n, s, g, bool(r.random() < 0.5), bool(r.random() < 0.5), \
        (np.float32, np.float16)[int(r.random() < 0.3)], 1 + seed % 2


@pytest.mark.parametrize("seed", _RANDOM_SEEDS)
def test_random_shapes(lib, isa, seed):
    _check_case(lib, seed, *_random_case(seed))


def _check_case(lib, seed, m, k, n, s, g, r2, bias, dtype, threads):
    w = random_mixed_linear(n, k, s, g, with_r2=r2, with_bias=bias, seed=seed)
    sess = _session(bml_model(w, ["M", k], dtype), lib, threads=threads)
    x = np.random.default_rng(seed).standard_normal((m, k)).astype(dtype)
    (y,) = sess.run(None, {"X": x})
    _assert_close(y, _reference(w, x), FP32_RTOL if dtype == np.float32 else FP16_RTOL)


@pytest.mark.parametrize("m,k,n,threads", [(64, 576, 200, 2), (256, 576, 96, 2),
                                           (200, 4096, 40, 2), (256, 1536, 64, 1)],
                         ids=lambda v: str(v))
def test_large_m(lib, isa, m, k, n, threads):
    """Large-M tiles, several passes over the rows of X (K = 4096), two threads."""
    w = _weights(n, k, 0.2, 0, True, True, seed=m + n)
    sess = _session(bml_model(w, ["M", k]), lib, threads=threads)
    x = np.random.default_rng(m).standard_normal((m, k)).astype(np.float32)
    (y,) = sess.run(None, {"X": x})
    _assert_close(y, _reference(w, x), FP32_RTOL)


# Random shapes for both algorithms: odd N (panel tails of the GEMM), K, salient counts and
# groups (padded code slots), r2, bias, fp16, 1 and 2 threads, M from 1 to several row tiles.
@pytest.mark.parametrize("m,k,n,frac,g", [(1, 576, 1536, 0.2, 0), (3, 1000, 77, 0.2, 32),
                                           (17, 300, 200, 0.5, 8), (1, 132_000, 16, 0.0, 0),
                                           (2, 33_000, 16, 1.0, 0)])
def test_integer_tables_same_on_avx2_and_avx512(lib, monkeypatch, m, k, n, frac, g):
    """The AVX2 path builds the AVX-512 path's integer table entries by the same arithmetic
    and sums the same integers (vpshufb over byte-major lines against vpermb + vpdpbusd), so
    their outputs are equal bit for bit, long rows (several int32 sums) included."""
    for name in ("avx2", "avx512"):
        if missing_isa_flags(name):
            pytest.skip(f"needs both paths; CPU lacks {', '.join(missing_isa_flags(name))}")
    w = _weights(n, k, frac, g, True, True, seed=k + n)
    x = np.random.default_rng(k).standard_normal((m, k)).astype(np.float32)
    x[:, 3] *= 500.0  # an outlier channel sets its section's step
    monkeypatch.setenv("QEXPORT_CPU_ALGO", "tables")
    out = {}
    for name in ("avx2", "avx512"):
        monkeypatch.setenv("QEXPORT_CPU_ISA", name)
        (out[name],) = _session(bml_model(w, ["M", k]), lib, threads=2).run(None, {"X": x})
    np.testing.assert_array_equal(out["avx2"], out["avx512"])
    _assert_close(out["avx2"], _reference(w, x), FP32_RTOL)


_ALGO_SEEDS = list(range(10))


def _algo_case(seed):
    r = np.random.default_rng(2000 + seed)
    m = int(r.choice([1, 3, 8, 12, 17, 33, 64, 100, 257]))
    k = int(r.integers(1, 1300))
    n = int(r.integers(1, 300)) | 1 if r.random() < 0.6 else int(r.choice([16, 32, 64, 192]))
    s = int(r.integers(0, k + 1)) if r.random() < 0.3 else int(round(k * r.uniform(0, 0.4)))
    g = int(r.choice([0, 1, 3, 8, 32, 64]))
    return m, k, n, s, g, bool(r.random() < 0.5), bool(r.random() < 0.5), \
        (np.float32, np.float16)[int(r.random() < 0.3)], 1 + seed % 2


@pytest.mark.parametrize("seed", _ALGO_SEEDS)
def test_algorithms_random_shapes(lib, isa, algo, seed):
    _check_case(lib, seed, *_algo_case(seed))


@pytest.mark.parametrize("frac,g", [(0.0, 0), (1.0, 0), (1.0, 24)], ids=["w1", "w4", "w4-G24"])
def test_algorithms_one_kind(lib, isa, algo, frac, g):
    """No salient column (w1) or only salient ones (w4): one part of the packed weights empty."""
    w = _weights(77, 301, frac, g, True, True, seed=4)
    sess = _session(bml_model(w, ["M", 301]), lib, threads=2)
    x = np.random.default_rng(5).standard_normal((37, 301)).astype(np.float32)
    (y,) = sess.run(None, {"X": x})
    _assert_close(y, _reference(w, x), FP32_RTOL)


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["fp32", "fp16"])
def test_gemm_passes_and_strips(lib, isa, algo, dtype):
    """K = 4096 and M = 300: fp16 X is converted in two passes of rows, fp16 Y written in
    strips of 64 rows; N = 40 leaves a partial panel."""
    w = _weights(40, 4096, 0.2, 128, True, True, seed=8)
    sess = _session(bml_model(w, ["M", 4096], dtype), lib, threads=2)
    x = np.random.default_rng(9).standard_normal((300, 4096)).astype(dtype)
    (y,) = sess.run(None, {"X": x})
    _assert_close(y, _reference(w, x), FP32_RTOL if dtype == np.float32 else FP16_RTOL)


@pytest.mark.parametrize("m,n", [(3, 16), (4, 16), (8, 64), (16, 100), (16, 140), (64, 190),
                                 (64, 230), (256, 240), (256, 300), (20, 576)],
                         ids=lambda v: str(v))
def test_auto_crossover(lib, isa, m, n):
    """Shapes on both sides of the automatic choice between tables and GEMM (a cost model per
    CPU path: the boundary moves with M, N, K and the salient share)."""
    w = _weights(n, 576, 0.2, 64, True, True, seed=m + n)
    sess = _session(bml_model(w, ["M", 576]), lib)
    x = np.random.default_rng(n).standard_normal((m, 576)).astype(np.float32)
    (y,) = sess.run(None, {"X": x})
    _assert_close(y, _reference(w, x), FP32_RTOL)


@pytest.mark.parametrize("k,n,ms", [(1100, 1500, (1, 5, 1, 40, 12, 1)), (16000, 64, (9, 1, 9))],
                         ids=["tiles", "passes"])
def test_small_m_threaded(lib, isa, k, n, ms):
    """Small M above the serial cutoff on 2 threads: each task's thread builds its own tables
    once per pass (stamped). Consecutive calls with new X, a large-M call in between (it
    reuses the same scratch), and K so large that the rows of X go in several passes."""
    w = _weights(n, k, 0.2, 64, True, True, seed=k)
    sess = _session(bml_model(w, ["M", k]), lib, threads=2)
    rng = np.random.default_rng(k)
    for m in ms:
        x = rng.standard_normal((m, k)).astype(np.float32)
        (y,) = sess.run(None, {"X": x})
        _assert_close(y, _reference(w, x), FP32_RTOL)


@pytest.mark.parametrize("frac,g", [(1.0, 64), (0.2, 16)], ids=["all-4-bit-head", "w1.61-G16"])
def test_one_row_alone_equals_it_among_others(lib, isa, frac, g):
    """A row of X alone reads a tile's salient groups one after another (one stream over the
    codes), among other rows group by group: each output adds the same terms in the same
    order, so the results are equal bit for bit. Several tiles of 128 rows and several
    salient groups (the 4-bit head's layout)."""
    w = _weights(300, 576, frac, g, False, True, seed=3)
    sess = _session(bml_model(w, ["M", 576]), lib, threads=1)
    x = np.random.default_rng(3).standard_normal((3, 576)).astype(np.float32)
    (many,) = sess.run(None, {"X": x})
    for r in range(3):
        (one,) = sess.run(None, {"X": x[r:r + 1]})
        np.testing.assert_array_equal(one[0], many[r])
    _assert_close(many, _reference(w, x), FP32_RTOL)


def test_same_session_many_runs(lib, isa):
    """Packed weights are cached per kernel: later runs (other M, other X) stay right."""
    w = _weights(33, 100, 0.2, 8, True, True, seed=9)
    sess = _session(bml_model(w, ["M", 100]), lib, threads=2)
    rng = np.random.default_rng(4)
    for m in (1, 7, 1, 70, 3):
        x = rng.standard_normal((m, 100)).astype(np.float32)
        (y,) = sess.run(None, {"X": x})
        _assert_close(y, _reference(w, x), FP32_RTOL)


def test_small_layers_share_chunks(lib):
    """Packed weights under 16 MiB are pieces of shared 32 MiB chunks (SmallArena in
    plugins/common/qexport_arena.cpp; 16 of these 1.9 MB layers fill one). Layers released
    and packed again in turn, so that a full chunk is unmapped, a partly used one is filled
    on, and the newest is reused from its start once empty: every live session still
    computes its own layer."""
    import gc

    rng = np.random.default_rng(8)
    x = rng.standard_normal((1, 4096)).astype(np.float32)

    def pack(seeds):  # the first run packs
        out = {}
        for seed in seeds:
            w = _weights(2304, 4096, 0.2, 128, False, False, seed=seed)
            out[seed] = (w, _session(bml_model(w, ["M", 4096]), lib))
            out[seed][1].run(None, {"X": x})
        return out

    def check(live):
        for w, sess in live.values():
            _assert_close(sess.run(None, {"X": x})[0], _reference(w, x), FP32_RTOL)

    live = pack(range(20))  # chunk 1: layers 0-15, chunk 2: 16-19
    check(live)
    for seed in range(19):  # chunk 1 emptied (unmapped); chunk 2 keeps layer 19
        del live[seed]
    gc.collect()
    live.update(pack(range(20, 34)))  # on in chunk 2, then chunk 3
    check(live)
    live.clear()
    gc.collect()
    live.update(pack(range(40, 44)))  # chunk 3, empty and newest: from its start
    check(live)


def test_large_layer_maps_its_own(lib):
    """Packed weights of 16 MiB and more get a mapping of their own (HugePageBuffer), next to
    small layers in a chunk."""
    rng = np.random.default_rng(9)
    x = rng.standard_normal((2, 8192)).astype(np.float32)
    big = _weights(12288, 8192, 0.2, 0, False, True, seed=5)  # 20.3 MB packed
    small = _weights(64, 8192, 0.2, 0, False, False, seed=6)
    sessions = [(w, _session(bml_model(w, ["M", 8192]), lib)) for w in (small, big)]
    for w, sess in sessions:
        _assert_close(sess.run(None, {"X": x})[0], _reference(w, x), FP32_RTOL)


def test_external_data_weights(lib, isa, tmp_path):
    """Weights in a page-aligned external data file (qexport.onnx_export.save_external_aligned, as
    large exports are written): ONNX Runtime maps them, the kernel packs them once and hands
    the mapped pages back (MADV_PAGEOUT); later runs, which skip the content checks of cached
    weights, and a page-in of the released pages (the plain kernel reads layout 1 again for a
    non-finite X) stay right."""
    import onnx
    import onnxruntime as ort

    from qexport import native
    from qexport.onnx_export import EXTERNAL_DATA_ALIGN, save_external_aligned

    w = _weights(300, 576, 0.2, 64, True, True, seed=11)
    path = tmp_path / "model.onnx"
    data = save_external_aligned(bml_model(w, ["M", 576]), path, min_bytes=64)
    loaded = onnx.load(str(path), load_external_data=False)
    offsets = [int(e.value) for t in loaded.graph.initializer for e in t.external_data
               if e.key == "offset"]
    assert len(offsets) >= 6 and all(o % EXTERNAL_DATA_ALIGN == 0 for o in offsets)
    assert data.stat().st_size >= max(offsets)
    options = native.session_options(lib)
    options.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), sess_options=options,
                                providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(6)
    for m in (1, 5, 1, 40):
        x = rng.standard_normal((m, 576)).astype(np.float32)
        (y,) = sess.run(None, {"X": x})
        _assert_close(y, _reference(w, x), FP32_RTOL)
    x[3, 10] = np.inf
    (y,) = sess.run(None, {"X": x})
    ref = _reference(w, x)
    np.testing.assert_array_equal(np.isnan(y), np.isnan(ref))
    finite = np.isfinite(ref)
    _assert_close(np.where(finite, y, 0), np.where(finite, ref, 0), FP32_RTOL)


def test_weights_fed_at_run_time(lib, isa):
    """Weight inputs that are not constant initializers (graph inputs) are packed on every
    call, never served from the cache: feeding other weights gives their result."""
    from onnx import helper, numpy_helper

    w1 = _weights(21, 90, 0.2, 8, True, True, seed=1)
    w2 = _weights(21, 90, 0.2, 8, True, True, seed=2)
    w2.salient_idx = w1.salient_idx.clone()  # any valid weights of the same shapes
    w2.validate()
    model = bml_model(w1, ["M", 90])
    for init in model.graph.initializer:  # an initializer named as a graph input: overridable
        model.graph.input.append(helper.make_tensor_value_info(
            init.name, init.data_type, list(init.dims)))
    sess = _session(model, lib)
    x = np.random.default_rng(5).standard_normal((3, 90)).astype(np.float32)
    (y1,) = sess.run(None, {"X": x})
    _assert_close(y1, _reference(w1, x), FP32_RTOL)
    feed = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    names = list(B.INPUT_NAMES)
    for i, t in enumerate(w2.tensors(), start=1):
        if t is not None:
            feed[names[i]] = t.numpy()
    (y2,) = sess.run(None, {"X": x, **feed})
    _assert_close(y2, _reference(w2, x), FP32_RTOL)


def test_non_finite_activations(lib, isa):
    """An infinity in X goes through the plain kernel: inf/NaN exactly where the reference."""
    w = _weights(20, 50, 0.2, 4, True, False, seed=2)
    sess = _session(bml_model(w, ["M", 50]), lib)
    x = np.random.default_rng(3).standard_normal((3, 50)).astype(np.float32)
    x[1, 7] = np.inf
    (y,) = sess.run(None, {"X": x})
    ref = _reference(w, x)
    np.testing.assert_array_equal(np.isnan(y), np.isnan(ref))
    np.testing.assert_array_equal(np.isinf(y), np.isinf(ref))
    finite = np.isfinite(ref)
    _assert_close(np.where(finite, y, 0), np.where(finite, ref, 0), FP32_RTOL)


@pytest.mark.parametrize("env,value,choice", [("QEXPORT_CPU_ISA", "sse9", "portable"),
                                               ("QEXPORT_CPU_ALGO", "fastest", "gemm")])
def test_path_env_rejects_unknown(lib, monkeypatch, env, value, choice):
    monkeypatch.setenv(env, value)
    w = _weights(4, 16, 0.0, 0, False, False)
    with pytest.raises(ort_errors()) as info:
        ort_session(bml_model(w, ["M", 16]), lib)
    msg = str(info.value)
    assert env in msg and value in msg and choice in msg, msg


@pytest.mark.parametrize("name", ["avx2", "avx512"])
def test_isa_env_refuses_missing(lib, monkeypatch, name):
    if not missing_isa_flags(name):
        pytest.skip(f"this CPU has {name}: nothing to refuse")
    monkeypatch.setenv("QEXPORT_CPU_ISA", name)
    w = _weights(4, 16, 0.0, 0, False, False)
    with pytest.raises(ort_errors(), match="lacks"):
        ort_session(bml_model(w, ["M", 16]), lib)


# ---------------------------------------------------------------- inputs the kernel must reject
N, K, S, G = 6, 40, 10, 4  # Kb = 30: sign_packed [6, 4]; groups = 3


def _bad_weights():
    return _weights(N, K, S / K, G, True, True, seed=21)


def _tensors(w):
    return [None if t is None else t.numpy().copy() for t in w.tensors()]


def _wrong_dtype(i, dtype):
    def mutate(t, attrs):
        t[i - 1] = t[i - 1].astype(dtype)
    return mutate


def _set(i, fn):
    def mutate(t, attrs):
        t[i - 1] = fn(t[i - 1])
    return mutate


def _attr(name, value):
    def mutate(t, attrs):
        attrs[name] = value
    return mutate


def _idx(values):
    return _set(B.IN_SALIENT_IDX, lambda a: np.array(values, dtype=np.int32))


_SORTED = list(range(0, 40, 4))  # 10 salient channels
_BAD = {
    # wrong dtype of every weight input
    "dtype-sign_packed": (_wrong_dtype(B.IN_SIGN_PACKED, np.int8), "'sign_packed'", "expected uint8"),
    "dtype-row_scale": (_wrong_dtype(B.IN_ROW_SCALE, np.float32), "'row_scale'", "expected float16"),
    "dtype-row_offset": (_wrong_dtype(B.IN_ROW_OFFSET, np.float64), "'row_offset'", "expected float16"),
    "dtype-salient_idx": (_wrong_dtype(B.IN_SALIENT_IDX, np.int64), "'salient_idx'", "expected int32"),
    "dtype-salient_packed": (_wrong_dtype(B.IN_SALIENT_PACKED, np.int32), "'salient_packed'",
                             "expected uint8"),
    "dtype-salient_scale": (_wrong_dtype(B.IN_SALIENT_SCALE, np.float32), "'salient_scale'",
                            "expected float16"),
    "dtype-salient_zero": (_wrong_dtype(B.IN_SALIENT_ZERO, np.int8), "'salient_zero'", "expected uint8"),
    "dtype-r2": (_wrong_dtype(B.IN_R2, np.float32), "'r2'", "expected float16"),
    "dtype-bias": (_wrong_dtype(B.IN_BIAS, np.float16), "'bias'", "expected float"),
    # shapes disagreeing with the attributes
    "shape-sign_packed": (_set(B.IN_SIGN_PACKED, lambda a: a[:, :-1]), "'sign_packed'", "[6, 3]"),
    "shape-row_scale": (_set(B.IN_ROW_SCALE, lambda a: np.concatenate([a, a[:1]])), "'row_scale'",
                        "[7]"),
    "shape-row_offset": (_set(B.IN_ROW_OFFSET, lambda a: a[None]), "'row_offset'", "[1, 6]"),
    "shape-salient_packed": (_set(B.IN_SALIENT_PACKED, lambda a: a[:-1]), "'salient_packed'",
                             "[5, 5]"),
    "shape-salient_scale": (_attr(B.ATTR_SALIENT_GROUP_SIZE, 5), "'salient_scale'",
                            "expected float16 [6, 2]"),
    "shape-salient_zero": (_set(B.IN_SALIENT_ZERO, lambda a: a[:, :2]), "'salient_zero'", "[6, 2]"),
    "shape-r2": (_set(B.IN_R2, lambda a: a[:-1]), "'r2'", "[29]"),
    "shape-bias": (_set(B.IN_BIAS, lambda a: a[:3]), "'bias'", "[3]"),
    "shape-salient_idx-2d": (_set(B.IN_SALIENT_IDX, lambda a: a[None]), "'salient_idx'", "[1, 10]"),
    "in_features": (_attr(B.ATTR_IN_FEATURES, 41), "'X'", "[2, 40]"),
    "out_features": (_attr(B.ATTR_OUT_FEATURES, 5), "'sign_packed'", "out_features=5"),
    # salient_idx contents
    "idx-out-of-range": (_idx(_SORTED[:-1] + [40]), "'salient_idx'", "out of range"),
    "idx-negative": (_idx([-1] + _SORTED[1:]), "'salient_idx'", "out of range"),
    "idx-not-increasing": (_idx(_SORTED[:4] + [_SORTED[5], _SORTED[4]] + _SORTED[6:]),
                           "'salient_idx'", "not strictly increasing"),
    "idx-duplicate": (_idx(_SORTED[:5] + [_SORTED[4]] + _SORTED[6:]), "'salient_idx'",
                      "not strictly increasing"),
    # zero point above 15
    "zero-16": (_set(B.IN_SALIENT_ZERO, lambda a: np.where(np.arange(a.size).reshape(a.shape) == 7,
                                                          16, a).astype(np.uint8)),
                "'salient_zero'", "16 at [2, 1]"),
    # attributes
    "layout-2": (_attr(B.ATTR_LAYOUT, 2), "'layout'", "unknown"),
    "group-size-negative": (_attr(B.ATTR_SALIENT_GROUP_SIZE, -1), "'salient_group_size'", ">= 0"),
}


@pytest.mark.parametrize("case", list(_BAD), ids=list(_BAD))
def test_rejects_bad_inputs(lib, case):
    mutate, name, detail = _BAD[case]
    w = _bad_weights()
    tensors, attrs = _tensors(w), dict(w.attributes())
    mutate(tensors, attrs)
    model = bml_model(w, ["M", K], tensors=tensors, attributes=attrs, check=False)
    x = np.random.default_rng(0).standard_normal((2, K)).astype(np.float32)
    with pytest.raises(ort_errors()) as info:
        ort_session(model, lib).run(None, {"X": x})
    msg = str(info.value)
    assert "BinaryMixedLinear" in msg and name in msg and detail in msg, msg


def test_rejects_missing_attribute(lib):
    w = _bad_weights()
    attrs = dict(w.attributes())
    del attrs[B.ATTR_IN_FEATURES]
    model = bml_model(w, ["M", K], attributes=attrs, check=False)
    with pytest.raises(ort_errors(), match="in_features"):
        ort_session(model, lib)


def test_x_feature_mismatch_at_run_time(lib):
    """A symbolic last dim lets a wrong X reach the kernel: the message names X and shapes."""
    w = _bad_weights()
    sess = ort_session(bml_model(w, ["M", "K"]), lib)
    with pytest.raises(ort_errors()) as info:
        sess.run(None, {"X": np.zeros((3, K + 1), np.float32)})
    msg = str(info.value)
    assert "'X'" in msg and "[3, 41]" in msg and "in_features=40" in msg, msg
