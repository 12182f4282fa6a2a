"""The out/-folder job is one function (qexport.pipeline.run) over one config, and the CLI is
a parser in front of it: same defaults, same bytes."""
from __future__ import annotations

import pytest
import torch

from qexport import cli, pipeline
from qexport.config import E2EConfig, LearnConfig, QuantizeConfig, RunConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_cli_defaults_are_the_config_defaults():
    args = cli.build_parser().parse_args(["some-model"])
    assert cli.run_config(args) == RunConfig("some-model")


def test_cli_flags_reach_the_config():
    args = cli.build_parser().parse_args([
        "m", "--scheme", "w4a16-g32", "--method", "closed-form", "--head-scheme", "none",
        "--no-embeddings-fp16", "--target", "trt", "--calib-samples", "3", "--threads", "1",
        "--preset", "fast", "--epochs", "5", "--no-share-r2"])
    config = cli.run_config(args)
    q = config.quantize
    assert (q.scheme.label, q.method, q.head_scheme, q.embeddings_fp16) == \
        ("w4a16-g32", "closed-form", None, False)
    assert (config.target, config.calib_samples, config.threads) == ("trt", 3, 1)
    assert q.learn == LearnConfig.preset("fast", epochs=5, share_r2=False)


@pytest.mark.parametrize("preset,flag,shared", [
    ("default", None, True), ("fast", None, True), ("best", None, False),
    ("default", "--no-share-r2", False), ("best", "--share-r2", True)])
def test_share_r2_is_the_presets_unless_asked(preset, flag, shared):
    """One r2 per activation (stacked q/k/v and gate/up) in the default and fast presets, one
    per Linear in best; the flag overrides either way."""
    args = cli.build_parser().parse_args(["m", "--preset", preset] + ([flag] if flag else []))
    assert cli.run_config(args).quantize.learn.share_r2 is shared


def test_cli_and_api_write_identical_model_bytes(tmp_path):
    from tiny_models import tiny_llama

    src = tmp_path / "tiny"
    tiny_llama().save_pretrained(src)
    common = ["--calib-samples", "2", "--calib-seqlen", "16", "--preset", "fast",
              "--no-perplexity", "--threads", "1", "--quiet"]
    assert cli.main([str(src), "-o", str(tmp_path / "cli"), *common]) == 0
    torch.manual_seed(1234)  # any global RNG state: the run must not depend on it
    result = pipeline.run(RunConfig(str(src), str(tmp_path / "api"), calib_samples=2,
                                    calib_seqlen=16, perplexity=False, threads=1,
                                    quantize=QuantizeConfig(learn=LearnConfig.preset("fast"),
                                                            e2e=E2EConfig.preset("fast"))))
    assert result.parity_ok and result.finish is None
    written = sorted(p.name for p in (tmp_path / "cli").iterdir())
    assert written == sorted(p.name for p in (tmp_path / "api").iterdir())
    for name in [n for n in written if n.startswith("model.onnx")]:
        assert (tmp_path / "cli" / name).read_bytes() == (tmp_path / "api" / name).read_bytes()


def test_bad_config_is_a_one_line_error_before_any_work(tmp_path):
    from qexport.errors import QexportError

    with pytest.raises(QexportError, match="--calib-samples must be at least 1"):
        pipeline.run(RunConfig("nope", str(tmp_path / "out"), calib_samples=0))
    with pytest.raises(QexportError, match="unknown target 'tpu'"):
        pipeline.run(RunConfig("nope", str(tmp_path / "out"), target="tpu"))
    assert not (tmp_path / "out").exists()
