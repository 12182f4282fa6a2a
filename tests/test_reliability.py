"""The op library inside other people's processes: one session shared by many threads from its
very first run (where the kernel packs its weights lazily), and damaged export folders, which
must give a clear error (at session creation or the first run: ONNX Runtime's error with the
kernel's message; at `qexport eval`: one line), never a crash or a wrong answer."""
from __future__ import annotations

import json
import shutil
import threading

import numpy as np
import onnx
import pytest
import torch

from native_helpers import ISAS, bml_model, missing_isa_flags, ort_errors, require_library
from test_cli import run_cli
from tiny_models import save_with_tokenizer, tiny_llama

THREADS, RUNS = 8, 50


def _weights(n, k, seed=0):
    from qexport.quantizers import quantize_mixed, select_salient

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    salient = select_salient(torch.rand(k, generator=g), 0.2)
    return quantize_mixed(w, torch.randn(n, generator=g), salient, 0)


def _session(model, library, threads):
    import onnxruntime as ort

    from qexport import native

    options = native.session_options(library)
    options.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), sess_options=options,
                                providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("ort_threads", [1, 2])
def test_one_session_many_threads_from_the_first_run(ort_threads, isa, monkeypatch):
    """8 threads × 50 runs of one fresh session, all starting at once (the first runs race to
    pack the weights), each with its own inputs of varying M (the tables at small M, the GEMM
    at larger ones), on each CPU path: every output equals, bit for bit, the same input run
    alone in another fresh session."""
    missing = missing_isa_flags(isa)
    if missing:
        pytest.skip(f"CPU lacks {', '.join(missing)} for the {isa} path")
    monkeypatch.setenv("QEXPORT_CPU_ISA", isa)
    lib = require_library()
    model = bml_model(_weights(384, 576), ["M", 576])
    rng = np.random.default_rng(0)
    inputs = [[rng.standard_normal((int(rng.choice([1, 2, 5, 16, 40])), 576)).astype(np.float32)
               for _ in range(RUNS)] for _ in range(THREADS)]
    shared = _session(model, lib, ort_threads)
    start = threading.Barrier(THREADS)
    results: list[list] = [[] for _ in range(THREADS)]
    errors: list[BaseException] = []

    def worker(t):
        try:
            start.wait()
            for x in inputs[t]:
                results[t].append(shared.run(None, {"X": x})[0])
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=300)
    assert not errors, errors[0]
    assert all(len(r) == RUNS for r in results)
    alone = _session(model, lib, ort_threads)
    for t in range(THREADS):
        for x, y in zip(inputs[t], results[t]):
            assert np.array_equal(y, alone.run(None, {"X": x})[0]), (t, x.shape)


# ------------------------------------------------------------------------- damaged exports
@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A small w1.61a16 export whose weights sit in model.onnx.data (a low threshold)."""
    tmp = tmp_path_factory.mktemp("damaged")
    src = save_with_tokenizer(tiny_llama(), tmp / "llama")
    out = tmp / "out"
    proc = run_cli(src, "-o", out, "--calib-samples", "2", "--calib-seqlen", "32", "--preset",
                   "fast", "--no-perplexity", "--no-kv-cache", "--threads", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    from qexport.onnx_export import save_external_aligned

    model = onnx.load(out / "model.onnx")
    save_external_aligned(model, out / "model.onnx", min_bytes=256)
    assert (out / "model.onnx.data").stat().st_size > 4096
    return out


def _copy(export, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(export, out)
    return out


def _session_error(folder) -> str:
    """The error of opening and running folder/model.onnx with the library; '' if it ran."""
    from qexport import native
    from qexport.errors import QexportError

    ref = np.load(folder / "reference.npz")
    try:
        session = native.make_session(folder / "model.onnx", threads=1)
        session.run(None, {"input_ids": ref["input_ids"]})
    except (QexportError, *ort_errors()) as e:
        return str(e)
    return ""


def _eval_error(folder) -> str:
    proc = run_cli("eval", folder, "--eval-tokens", "64", "--eval-window", "32", "--threads", "1")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("qexport: error:")]
    assert len(errors) == 1, proc.stderr[-2000:]
    return errors[0]


def test_intact_export_runs(export, tmp_path):
    assert _session_error(_copy(export, tmp_path)) == ""


def test_truncated_weight_file(export, tmp_path):
    out = _copy(export, tmp_path)
    data = out / "model.onnx.data"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    assert "out of bound" in _session_error(out)  # ONNX Runtime checks the file's length
    assert "cannot read" in _eval_error(out) and "exceeds file size" in _eval_error(out)


def _edit(folder, edit):
    """Rewrite folder/model.onnx (weights inline) after `edit(model)`."""
    model = onnx.load(folder / "model.onnx")
    edit(model)
    (folder / "model.onnx.data").unlink()
    onnx.save_model(model, folder / "model.onnx")


def _first_bml(model):
    return next(n for n in model.graph.node if n.op_type == "BinaryMixedLinear")


def test_packed_weight_of_the_wrong_length(export, tmp_path):
    from onnx import numpy_helper

    out = _copy(export, tmp_path)

    shape = []

    def cut(model):
        name = _first_bml(model).input[1]  # sign_packed
        init = next(t for t in model.graph.initializer if t.name == name)
        arr = numpy_helper.to_array(init)
        shape.extend(arr.shape)
        init.CopyFrom(numpy_helper.from_array(arr[:, :-1].copy(), name))
    _edit(out, cut)
    message = _session_error(out)  # the kernel's input check, naming node and input
    rows, cols = shape  # 7 bytes of signs a row (51 binary columns of 64); stacked q/k/v: 128
    assert f"'sign_packed' (#1) is uint8 [{rows}, {cols - 1}], expected uint8 [{rows}, {cols}]" \
        in message, message
    assert cols == 7, shape
    assert "is damaged" in _eval_error(out) and "sign_packed" in _eval_error(out)


def test_wrong_attribute(export, tmp_path):
    out = _copy(export, tmp_path)

    def wrong(model):
        node = _first_bml(model)
        attr = next(a for a in node.attribute if a.name == "in_features")
        attr.i += 8
    _edit(out, wrong)
    message = _session_error(out)
    assert "expected shape [..., 72] (in_features=72)" in message, message
    assert "is damaged" in _eval_error(out)


def test_library_of_another_contract_version(export, tmp_path, monkeypatch):
    """A library reporting another contract version is refused at session creation."""
    from qexport import native
    from qexport.errors import QexportError

    out = _copy(export, tmp_path)
    monkeypatch.setattr(native, "library_version", lambda path=None: 999)
    with pytest.raises(QexportError, match="contract"):
        native.make_session(out / "model.onnx")
    report = json.loads((out / "report.json").read_text())
    assert report["op_library"] is True
