"""Never a traceback for a user's model: a failure at any stage (here injected) ends in one
line naming the stage and the original error's first line, exit 2, and no output folder;
--debug adds the traceback."""
from __future__ import annotations

import pytest

from qexport import api, cli, check, models, onnx_export, pipeline, report

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _boom(*args, **kwargs):
    raise RuntimeError("boom from a library\nsecond line of its message")


# (what to replace, the stage named in the error)
STAGES = {
    "load": ((models, "load_model"), "loading"),
    "data": ((pipeline, "_load_data"), "reading the calibration"),
    "trace": ((api, "trace"), "tracing the model"),
    "calibrate": ((api, "collect_linear_input_stats"), "calibration"),
    "learn": ((api, "learn_mixed_weights"), "PTQ1.61 learning"),
    "quantize_layer": ((api, "quantize_linear"), "quantizing model.lm_head (128, 64)"),
    "export": ((onnx_export.torch.onnx, "export"), "exporting to ONNX"),
    "check": ((check, "layer_report"), "checking the export"),
    "report": ((report, "write"), "writing the report"),
}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tiny_models import tiny_llama

    d = tmp_path_factory.mktemp("tiny") / "llama"
    tiny_llama().save_pretrained(d)
    return d


@pytest.mark.parametrize("name", STAGES)
def test_injected_failure_is_one_line(name, tiny_dir, tmp_path, monkeypatch, capsys):
    (owner, attr), needle = STAGES[name]
    monkeypatch.setattr(owner, attr, _boom)
    out = tmp_path / "out"
    code = cli.main([str(tiny_dir), "-o", str(out), "--calib-samples", "1", "--calib-seqlen",
                     "16", "--preset", "fast", "--no-perplexity", "--quiet"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_USAGE, err
    lines = [line for line in err.splitlines() if line]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("qexport: error: ") and needle in lines[0], lines[0]
    assert "RuntimeError: boom from a library" in lines[0] and "second line" not in lines[0]
    # nothing half-written; a failure after PTQ1.61 learning keeps the learned blocks (the
    # work folder, tests/test_resume.py) and the one line says so
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert not out.exists() and left in ([], [pipeline.work_folder(out)]), left
    assert bool(left) == ("rerun the same command" in lines[0]), lines[0]


def test_debug_shows_the_traceback(tiny_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(api, "collect_linear_input_stats", _boom)
    code = cli.main([str(tiny_dir), "-o", str(tmp_path / "out"), "--calib-samples", "1",
                     "--quiet", "--debug"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_USAGE
    assert "Traceback" in err and "boom from a library" in err
    assert err.rstrip().splitlines()[-1].startswith("qexport: error: calibration failed")


def test_a_bug_outside_any_stage_is_still_one_line(monkeypatch, capsys):
    monkeypatch.setattr(pipeline, "run", _boom)
    assert cli.main(["whatever"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unexpected RuntimeError: boom" in err[0] and "--debug" in err[0]
