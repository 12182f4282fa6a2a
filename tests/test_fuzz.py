"""Property-based fuzzing of qexport::BinaryMixedLinear in ONNX Runtime (hypothesis).

Two properties, each on every CPU path the machine has (QEXPORT_CPU_ISA):
- valid inputs (random shapes, ranks, M = 0, salient counts, group sizes, optional inputs,
  fp32/fp16, 1-2 threads, the tables or GEMM path, X with NaN/Inf and magnitudes from 1e-3 to
  1e4): the output equals the PyTorch reference within the kernel tests' tolerances
  (test_kernel_cpu.py), non-finite values exactly where the reference has them;
- invalid inputs (one random defect of a valid layer: wrong dtype or rank, K/N disagreeing
  with the attributes, salient_idx out of range/duplicated/unsorted, a zero point > 15,
  truncated packed arrays, huge or negative feature counts that would overflow size
  computations, a bad layout or group size): session creation or the run raises an ONNX
  Runtime error whose message names the op, never a crash, a hang (hypothesis' deadline) or a
  wrong answer. (A huge group size is valid, one group per row: the valid cases draw it.)

The profile is fixed (derandomized: the same cases every run). CI runs QEXPORT_FUZZ_EXAMPLES
valid cases per path and as many invalid ones, split evenly over the 12 kinds of defect
(default 240: 1,440 cases on a machine with the three paths). The long run of
docs/reliability.md:
    QEXPORT_FUZZ_EXAMPLES=1700 python -m pytest -q tests/test_fuzz.py    # 10,212 cases
scripts/sanitizers.sh runs this file against the ASan + UBSan build of the library.
"""
from __future__ import annotations

import contextlib
import os

import numpy as np
import pytest
import torch

from hypothesis import HealthCheck, given, settings, strategies as st

from native_helpers import ISAS, bml_model, missing_isa_flags, ort_errors, require_library
from qexport.ops.binary_mixed_linear import contract as B
from qexport.ops.binary_mixed_linear import binary_mixed_linear_reference
from qexport.testing import random_mixed_linear

EXAMPLES = int(os.environ.get("QEXPORT_FUZZ_EXAMPLES", "240"))
FP32_RTOL = 1e-4  # as test_kernel_cpu.py (its docstring gives the reasons)
FP16_RTOL = 2.0 ** -9
# A case is a session creation and a run on at most ~300 x 600 x 130: a few ms. Several
# seconds means a hang (or a machine so loaded that the timings below are meaningless).
DEADLINE_MS = 20_000

HUGE_POSITIVE = [2**31 - 1, 2**31, 2**32 + 5, 2**62, 2**63 - 1]
HUGE = HUGE_POSITIVE + [-(2**63)]

FUZZ = settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=DEADLINE_MS,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
                print_blob=True)


@pytest.fixture(scope="module")
def lib():
    return require_library()


@pytest.fixture(params=ISAS)
def isa(request):
    missing = missing_isa_flags(request.param)
    if missing:
        pytest.skip(f"CPU lacks {', '.join(missing)} for the {request.param} path")
    return request.param


@contextlib.contextmanager
def _env(**values):
    """Sets environment variables for one hypothesis example (a fixture spans them all)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update({k: v for k, v in values.items() if v is not None})
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _session(model, lib, threads=1):
    import onnxruntime as ort

    from qexport import native

    options = native.session_options(lib)
    options.intra_op_num_threads = threads
    options.log_severity_level = 4  # the refused cases' errors are asserted, not logged
    return ort.InferenceSession(model.SerializeToString(), sess_options=options,
                                providers=["CPUExecutionProvider"])


_CASES: list[str] = []  # one entry per case run by the current property: its defect, or ''

# ------------------------------------------------------------------------------- valid inputs
@st.composite
def _layers(draw):
    """(weights, leading dims of X, dtype, threads, algorithm, X magnitude, non-finite count)."""
    k = draw(st.one_of(st.integers(1, 16), st.integers(1, 600)))
    n = draw(st.one_of(st.integers(1, 8), st.integers(1, 130)))
    s = draw(st.one_of(st.just(0), st.just(k), st.integers(0, k),
                       st.integers(0, max(0, k // 5))))
    # A group size above S is one group per row; huge ones catch size arithmetic that overflows.
    g = draw(st.one_of(st.just(0), st.sampled_from([1, 2, 3, 5, 8, 16, 32, 64, 128]),
                       st.integers(1, k + 8), st.sampled_from(HUGE_POSITIVE)))
    w = random_mixed_linear(n, k, s, g, with_r2=draw(st.booleans()),
                            with_bias=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)))
    m = draw(st.one_of(st.sampled_from([0, 1, 2, 3, 4, 8, 16, 17, 33, 64]),
                       st.integers(0, 300)))
    lead = draw(st.sampled_from(["2d", "1d", "3d", "4d"]))
    if lead == "1d" and m == 1:
        dims = []
    elif lead == "3d":
        dims = [draw(st.integers(0, 3)), m]
    elif lead == "4d":
        dims = [draw(st.integers(1, 2)), draw(st.integers(0, 2)), max(1, m // 4)]
    else:
        dims = [m]
    dtype = draw(st.sampled_from([np.float32, np.float16]))
    threads = draw(st.sampled_from([1, 2]))
    algo = draw(st.sampled_from([None, "tables", "gemm"]))
    scale = draw(st.sampled_from([1e-3, 1.0, 10.0] + ([1e2, 1e4] if dtype == np.float32 else [])))
    bad = draw(st.sampled_from([0, 0, 0, 1, 3]))  # NaN/Inf entries in X
    seed = draw(st.integers(0, 2**31 - 1))
    return w, dims, dtype, threads, algo, scale, bad, seed


@given(case=_layers())
@FUZZ
def _check_valid(lib, isa, case):
    w, dims, dtype, threads, algo, scale, bad, seed = case
    _CASES.append("")
    if algo == "gemm" and isa == "portable":
        algo = "tables"  # the portable path has no GEMM
    k = w.in_features
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(dims + [k]) * scale).astype(dtype)
    if bad and x.size:
        flat = x.reshape(-1)
        flat[rng.integers(0, flat.size, bad)] = rng.choice([np.nan, np.inf, -np.inf], bad)
    with _env(QEXPORT_CPU_ISA=isa, QEXPORT_CPU_ALGO=algo):
        sess = _session(bml_model(w, ["d%d" % i for i in range(len(dims))] + [k], dtype),
                        lib, threads)
    (y,) = sess.run(None, {"X": x})
    ref = binary_mixed_linear_reference(torch.from_numpy(x), *w.tensors(),
                                        **w.attributes()).numpy()
    assert y.shape == ref.shape and y.dtype == ref.dtype
    np.testing.assert_array_equal(np.isnan(y), np.isnan(ref))
    np.testing.assert_array_equal(np.isinf(y), np.isinf(ref))
    finite = np.isfinite(ref)
    if finite.any():
        y32, r32 = y[finite].astype(np.float32), ref[finite].astype(np.float32)
        scale_out = float(np.abs(r32).max()) or 1.0
        err = float(np.abs(y32 - r32).max())
        rtol = FP32_RTOL if dtype == np.float32 else FP16_RTOL
        assert err <= rtol * scale_out, (
            f"max abs error {err:.3g} > {rtol:.3g} * {scale_out:.3g} "
            f"(N={w.out_features} K={k} S={w.num_salient} G={w.salient_group_size} "
            f"X{list(x.shape)} {np.dtype(dtype).name} {algo} threads={threads})")


def _run(check, lib, isa, examples=EXAMPLES):
    """Runs a property; the case count is asserted (a strategy that filtered everything away, or
    a search space exhausted early, would otherwise pass on a handful of cases)."""
    _CASES.clear()
    check(lib, isa)
    assert len(_CASES) >= examples, f"only {len(_CASES)} of {examples} cases ran"
    print(f"{isa}: {len(_CASES)} cases {_CASES[0] or 'valid'}")


def test_valid_inputs_match_the_reference(lib, isa):
    _run(_check_valid, lib, isa)


# ----------------------------------------------------------------------------- invalid inputs
_DTYPES = [np.int8, np.uint8, np.int16, np.int32, np.int64, np.float16, np.float32, np.float64]
_EXPECTED_DTYPE = {B.IN_SIGN_PACKED: np.uint8, B.IN_ROW_SCALE: np.float16,
                   B.IN_ROW_OFFSET: np.float16, B.IN_SALIENT_IDX: np.int32,
                   B.IN_SALIENT_PACKED: np.uint8, B.IN_SALIENT_SCALE: np.float16,
                   B.IN_SALIENT_ZERO: np.uint8, B.IN_R2: np.float16, B.IN_BIAS: np.float32}


_DEFECTS = ["dtype", "rank", "shape", "attr", "huge", "truncate", "layout", "group", "idx-range",
            "idx-dup", "idx-order", "zero"]
_MIN_SALIENT = {"idx-range": 1, "zero": 1, "idx-dup": 2, "idx-order": 2}  # S the defect needs


@st.composite
def _defects(draw, kind):
    """A valid layer with one defect of `kind`: (tensors, attributes, weights, X, what)."""
    k = draw(st.integers(2, 200))
    n = draw(st.integers(1, 40))
    s = draw(st.integers(_MIN_SALIENT.get(kind, 0), k))
    g = draw(st.one_of(st.just(0), st.integers(1, k + 2)))
    w = random_mixed_linear(n, k, s, g, with_r2=draw(st.booleans()),
                            with_bias=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)))
    tensors = [None if t is None else t.numpy().copy() for t in w.tensors()]
    attrs = dict(w.attributes())
    present = [i for i in range(1, B.NUM_INPUTS) if tensors[i - 1] is not None
               and tensors[i - 1].size > 0]
    if kind == "dtype":
        i = draw(st.sampled_from(present))
        dt = draw(st.sampled_from([d for d in _DTYPES if d != _EXPECTED_DTYPE[i]]))
        tensors[i - 1] = tensors[i - 1].astype(dt)
        what = f"{B.INPUT_NAMES[i]} as {np.dtype(dt).name}"
    elif kind == "rank":
        i = draw(st.sampled_from(present))
        t = tensors[i - 1]
        tensors[i - 1] = t.reshape(-1) if t.ndim == 2 and draw(st.booleans()) else t[None]
        what = f"{B.INPUT_NAMES[i]} of rank {tensors[i - 1].ndim}"
    elif kind == "shape":
        i = draw(st.sampled_from(present))
        t = tensors[i - 1]
        axis = draw(st.integers(0, t.ndim - 1))
        delta = draw(st.integers(-t.shape[axis], 5).filter(lambda d: d != 0))
        if delta < 0:
            t = np.take(t, range(t.shape[axis] + delta), axis=axis)
        else:
            t = np.concatenate([t] + [np.take(t, [0], axis=axis)] * delta, axis=axis)
        tensors[i - 1] = t
        what = f"{B.INPUT_NAMES[i]} of shape {list(t.shape)}"
    elif kind == "attr":
        name = draw(st.sampled_from([B.ATTR_IN_FEATURES, B.ATTR_OUT_FEATURES]))
        delta = draw(st.integers(-attrs[name], 64).filter(lambda d: d != 0))
        attrs[name] += delta
        what = f"{name}={attrs[name]}"
    elif kind == "huge":
        name = draw(st.sampled_from([B.ATTR_IN_FEATURES, B.ATTR_OUT_FEATURES]))
        attrs[name] = draw(st.sampled_from(HUGE))
        what = f"{name}={attrs[name]}"
    elif kind == "truncate":
        i = draw(st.sampled_from([j for j in (B.IN_SIGN_PACKED, B.IN_SALIENT_PACKED)
                                  if j in present]))
        t = tensors[i - 1]
        cut = draw(st.integers(1, t.size))
        flat = t.reshape(-1)[: t.size - cut]
        rows = draw(st.booleans()) and flat.size % t.shape[0] == 0 and flat.size
        tensors[i - 1] = flat.reshape(t.shape[0], -1) if rows else flat
        what = f"{B.INPUT_NAMES[i]} truncated to {list(tensors[i - 1].shape)}"
    elif kind == "layout":
        attrs[B.ATTR_LAYOUT] = draw(st.sampled_from([0, 2, 3, -1, 2**31, 2**63 - 1]))
        what = f"layout={attrs[B.ATTR_LAYOUT]}"
    elif kind == "group":
        attrs[B.ATTR_SALIENT_GROUP_SIZE] = draw(st.integers(-(2**63), -1))
        what = f"salient_group_size={attrs[B.ATTR_SALIENT_GROUP_SIZE]}"
    elif kind == "idx-range":
        idx = tensors[B.IN_SALIENT_IDX - 1]
        pos = draw(st.integers(0, s - 1))
        idx[pos] = draw(st.one_of(st.integers(k, 2**31 - 1), st.integers(-(2**31), -1)))
        what = f"salient_idx[{pos}]={idx[pos]}"
    elif kind == "idx-dup":
        idx = tensors[B.IN_SALIENT_IDX - 1]
        pos = draw(st.integers(1, s - 1))
        idx[pos] = idx[pos - 1]
        what = f"salient_idx[{pos}] repeated"
    elif kind == "idx-order":
        idx = tensors[B.IN_SALIENT_IDX - 1]
        a = draw(st.integers(0, s - 2))
        b = draw(st.integers(a + 1, s - 1))
        idx[a], idx[b] = idx[b], idx[a]
        what = f"salient_idx[{a}] and [{b}] swapped"
    else:  # zero point above 15
        z = tensors[B.IN_SALIENT_ZERO - 1]
        pos = draw(st.integers(0, z.size - 1))
        z.reshape(-1)[pos] = draw(st.integers(16, 255))
        what = f"salient_zero[{pos}]={z.reshape(-1)[pos]}"
    m = draw(st.sampled_from([1, 2, 7, 40]))
    x = np.random.default_rng(draw(st.integers(0, 2**31 - 1))).standard_normal(
        (m, k)).astype(np.float32)
    return tensors, attrs, w, x, what


@pytest.mark.parametrize("defect", _DEFECTS)
def test_invalid_inputs_are_refused(lib, isa, defect):
    @given(case=_defects(defect))
    @settings(FUZZ, max_examples=-(-EXAMPLES // len(_DEFECTS)))
    def check(lib, isa, case):
        tensors, attrs, w, x, what = case
        _CASES.append(defect)
        model = bml_model(w, ["M", "K"], tensors=tensors, attributes=attrs, check=False)
        with _env(QEXPORT_CPU_ISA=isa):
            with pytest.raises(ort_errors()) as info:
                _session(model, lib).run(None, {"X": x})
        msg = str(info.value)
        assert B.OP_NAME in msg, f"{what}: {msg}"

    _run(check, lib, isa, -(-EXAMPLES // len(_DEFECTS)))


def test_library_is_sanitized_when_expected(lib):
    """scripts/sanitizers.sh sets QEXPORT_EXPECT_SANITIZED: the library under test must then be
    the instrumented build (a run against the plain one would come out clean for nothing)."""
    if os.environ.get("QEXPORT_EXPECT_SANITIZED") != "1":
        pytest.skip("not a sanitizer run (scripts/sanitizers.sh sets QEXPORT_EXPECT_SANITIZED=1)")
    data = lib.read_bytes()
    assert b"__asan_init" in data and b"__ubsan_handle" in data, f"{lib} is not instrumented"
