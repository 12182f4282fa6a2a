"""Bad input gets a one-line error, a non-zero exit and no output folder (run as a user would)."""
import os
import subprocess
import sys

import onnx
import pytest


def run_cli(*args, cwd=None, timeout=900):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "qexport.cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, env=env, timeout=timeout)


def assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    errors = [l for l in proc.stderr.splitlines() if l.startswith("qexport: error:")]
    assert len(errors) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


@pytest.fixture
def tiny_llama_dir(tmp_path):
    from tiny_models import tiny_llama
    d = tmp_path / "tiny-llama"
    tiny_llama().save_pretrained(d)
    return d


def test_missing_file(tmp_path):
    out = tmp_path / "out"
    proc = run_cli(tmp_path / "nope.pt2", "-o", out)
    assert_one_line_error(proc, "no such file")
    assert not out.exists()


def test_corrupt_file(tmp_path):
    bad = tmp_path / "model.pt2"
    bad.write_bytes(os.urandom(256))
    out = tmp_path / "out"
    assert_one_line_error(run_cli(bad, "-o", out), "model.pt2")
    assert not out.exists()


def test_unsupported_format(tmp_path):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"GGUF....")
    out = tmp_path / "out"
    assert_one_line_error(run_cli(f, "-o", out), "supported")
    assert not out.exists()


def test_pickle_needs_flag(tmp_path):
    import torch
    f = tmp_path / "model.pt"
    torch.save(torch.nn.Linear(4, 4), f)
    out = tmp_path / "out"
    assert_one_line_error(run_cli(f, "-o", out), "--trust-pickle")
    assert not out.exists()


def test_bad_scheme(tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    assert_one_line_error(run_cli(tiny_llama_dir, "--scheme", "w3a8", "-o", out),
                          "unknown scheme", "w1.61a16")
    assert not out.exists()


@pytest.mark.parametrize("args,needle", [(["--os-quantile", "1.5"], "--os-quantile"),
                                          (["--os-grid", "0"], "--os-grid"),
                                          (["--epochs", "0"], "--epochs"),
                                          (["--lr", "-1"], "--lr")])
def test_bad_quantization_settings(tiny_llama_dir, tmp_path, args, needle):
    out = tmp_path / "out"
    assert_one_line_error(run_cli(tiny_llama_dir, "--outlier-suppression", *args, "-o", out),
                          needle)
    assert not out.exists()


def test_learning_settings_reach_the_report(tiny_llama_dir, tmp_path):
    import json
    out = tmp_path / "out"
    proc = run_cli(tiny_llama_dir, "-o", out, "--calib-samples", "2", "--calib-seqlen", "16",
                   "--preset", "fast", "--epochs", "3", "--lr", "0.05")
    assert proc.returncode == 0, proc.stderr
    learn = json.loads((out / "report.json").read_text())["config"]["learn"]
    assert learn["epochs"] == 3 and learn["lr_alpha"] == learn["lr_r1"] == learn["lr_r2"] == 0.05
    assert learn["n_samples"] == 16  # the rest of the preset stays


def test_unwritable_output(tiny_llama_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = blocker / "out"  # a folder below a regular file cannot be created
    assert_one_line_error(run_cli(tiny_llama_dir, "-o", out, "--calib-samples", "1"), str(out))
    assert not out.exists()


def test_foreign_output_folder_is_not_replaced(tiny_llama_dir, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "precious.txt").write_text("keep")
    assert_one_line_error(run_cli(tiny_llama_dir, "-o", out, "--calib-samples", "1"), "--force")
    assert (out / "precious.txt").read_text() == "keep"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_parity_failure_exits_3_and_says_so(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    """A backend that disagrees with the reference is a bug: report written, exit code 3."""
    import json

    import numpy as np

    from qexport import cli, native

    real_make_session = native.make_session

    class Corrupted:
        def __init__(self, session):
            self.session = session

        def __getattr__(self, name):  # get_inputs, get_outputs, ...: the real session's
            return getattr(self.session, name)

        def run(self, names, feeds):
            outs = self.session.run(names, feeds)
            rng = np.random.default_rng(0)
            return [o + rng.standard_normal(o.shape).astype(o.dtype) * o.std() for o in outs]

    monkeypatch.setattr(native, "make_session", lambda *a, **k: Corrupted(real_make_session(*a, **k)))
    out = tmp_path / "out"
    code = cli.main([str(tiny_llama_dir), "-o", str(out), "--calib-samples", "1",
                     "--calib-seqlen", "16", "--quiet"])
    assert code == cli.EXIT_PARITY
    assert "parity check failed" in capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["parity"]["ok"] is False
    assert "FAILED" in (out / "report.md").read_text()


def test_target_trt_without_tensorrt_says_what_is_missing(tiny_llama_dir, tmp_path):
    from qexport.targets import trt
    reason = trt.engine_prerequisites()
    if reason is None:
        pytest.skip("TensorRT and a GPU are present: the engine is built instead")
    out = tmp_path / "out"
    proc = run_cli(tiny_llama_dir, "--target", "trt", "-o", out, "--calib-samples", "1",
                   "--calib-seqlen", "16")
    assert proc.returncode == 4, proc.stderr
    errors = [l for l in proc.stderr.splitlines() if l.startswith("qexport: error:")]
    assert len(errors) == 1 and "no TensorRT engine built" in errors[0] and "Traceback" not in proc.stderr
    assert (out / "model.onnx").exists() and (out / "report.json").exists()
    # For TensorRT the attention stays in standard ops (its parser lacks ORT's contrib ops).
    assert not [n for n in onnx.load(out / "model.onnx").graph.node if n.domain == "com.microsoft"]
    # build-engine on that export says the same in one line.
    proc = run_cli("build-engine", out / "model.onnx")
    assert proc.returncode == 4 and "cannot build a TensorRT engine" in proc.stderr
    assert_one_line_error(run_cli("build-engine", tmp_path / "missing.onnx"), "no such file")


def test_build_engine_refuses_contrib_ops(tmp_path):
    """An ONNX Runtime export (fused attention: GroupQueryAttention) cannot become an engine:
    a one-line error naming the way out, before looking for TensorRT."""
    import torch

    from qexport.onnx_export import export_onnx, trace
    from qexport.families.attention import fused_attention
    from tiny_models import LogitsOnly, tiny_llama
    example = (torch.randint(0, 128, (1, 8)),)
    export_onnx(trace(LogitsOnly(tiny_llama()), example, swap=fused_attention), example,
                tmp_path / "m.onnx", {})
    assert_one_line_error(run_cli("build-engine", tmp_path / "m.onnx"),
                          "GroupQueryAttention", "--no-fused-attention")
