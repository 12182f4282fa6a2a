"""End-to-end tuning (qexport/e2e.py): the continuous parameters move, the discrete ones do not,
the format stays the same, and the model gets closer to the fp one."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from qexport.config import E2EConfig, LearnConfig
from qexport.errors import QexportError
from qexport.e2e import _Tunable, norm_weights, tune_end_to_end
from qexport.families import find_blocks
from qexport.ptq161 import learn_mixed_weights, substituted_weights
from qexport.testing import random_mixed_linear

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _kl(model, packed, ids, tensors=None):
    with torch.no_grad():
        teacher = F.log_softmax(model(ids), -1)
        with substituted_weights(model, packed, tensors):
            student = F.log_softmax(model(ids), -1)
    return float(F.kl_div(student.flatten(0, -2), teacher.flatten(0, -2), log_target=True,
                          reduction="batchmean"))


@pytest.mark.parametrize("r2,bias,g", [(True, True, 0), (False, False, 4), (True, False, 3)])
def test_untrained_tunable_is_the_packed_weight(r2, bias, g):
    w = random_mixed_linear(12, 40, 7, g, with_r2=r2, with_bias=bias, seed=3)
    t = _Tunable(w, train_r2=True)
    assert torch.equal(t.weight().detach(), w.dequantize())
    back = t.pack()
    for a, b in zip(w.tensors(), back.tensors()):
        assert (a is None and b is None) or torch.equal(a, b)


def _tiny_learned(rows: int, seed: int, learn: LearnConfig, learn_rows: int | None = None):
    """A tiny Llama with logits, `rows` calibration rows of 32 ids, and its block Linears
    learned by PTQ1.61 on the first `learn_rows` of them (salient channels 0, 9, 17, 30).
    Returns (model, ids, block path, packed)."""
    from tiny_models import LogitsOnly, tiny_llama

    model = LogitsOnly(tiny_llama())
    ids = torch.randint(0, 128, (rows, 32), generator=torch.Generator().manual_seed(seed))
    path, blocks = find_blocks(model)
    names = [f"{path}.{bi}.{sub}" for bi, b in enumerate(blocks)
             for sub, m in b.named_modules() if isinstance(m, torch.nn.Linear)]
    salient = {n: torch.tensor([0, 9, 17, 30]) for n in names}
    packed = learn_mixed_weights(model, ids[:learn_rows or rows], salient, 0, learn)
    return model, ids, path, packed


def test_tuning_lowers_the_kl_and_keeps_the_codes():
    model, ids, _, packed = _tiny_learned(8, 0, LearnConfig(epochs=1), learn_rows=4)
    before = _kl(model, packed, ids[4:])  # held-out rows
    params = {k: v.clone() for k, v in model.state_dict().items()}
    result = tune_end_to_end(model, packed, ids[:4], E2EConfig(epochs=6, lr_scale=1e-2,
                                                               lr_bias=1e-3))
    tuned = result.packed
    after = _kl(model, tuned, ids[4:], result.tensors)
    assert after < 0.9 * before, (before, after)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in params.items())  # untouched
    for name, w in packed.items():
        t = tuned[name]
        t.validate()
        for f in ("sign_packed", "salient_idx", "salient_packed", "salient_zero"):
            assert torch.equal(getattr(w, f), getattr(t, f)), (name, f)
        assert not torch.equal(w.row_scale, t.row_scale)  # trained
        assert t.row_scale.dtype == torch.float16 and t.weight_nbytes() == w.weight_nbytes()
    # every norm weight trained, none of the model's own changed
    assert sorted(result.tensors) == sorted(norm_weights(model)) and result.tensors
    params = dict(model.named_parameters())
    for name, value in result.tensors.items():
        assert value.dtype == params[name].dtype and not torch.equal(value, params[name])


def test_shared_r2_stays_shared():
    """With LearnConfig.share_r2 the Linears reading one activation share r2; end-to-end
    tuning trains it as one factor, so they still stack into one op."""
    model, ids, path, packed = _tiny_learned(4, 1, LearnConfig(epochs=1, share_r2=True))
    qkv = [f"{path}.0.self_attn.{p}_proj" for p in "qkv"]
    assert all(packed[qkv[0]].stacks_with(packed[n]) for n in qkv[1:])
    tuned = tune_end_to_end(model, packed, ids, E2EConfig(epochs=2, lr_scale=1e-2)).packed
    assert all(tuned[qkv[0]].stacks_with(tuned[n]) for n in qkv[1:])  # one r2 for the three
    assert not torch.equal(tuned[qkv[0]].r2, packed[qkv[0]].r2)  # and it was trained
    gate_up = [f"{path}.0.mlp.{p}_proj" for p in ("gate", "up")]
    assert tuned[gate_up[0]].stacks_with(tuned[gate_up[1]])
    assert not tuned[qkv[0]].stacks_with(tuned[gate_up[0]])


def test_rejects_a_name_that_is_not_a_linear():
    from tiny_models import LogitsOnly, tiny_llama

    model = LogitsOnly(tiny_llama())
    w = random_mixed_linear(4, 8, 0, 0)
    with pytest.raises(QexportError, match="not a Linear"):
        tune_end_to_end(model, {"model.model.nothing": w}, torch.zeros(1, 4, dtype=torch.long))


def test_config_round_trip():
    c = E2EConfig(epochs=2)
    assert E2EConfig(**c.as_dict()) == c and dataclasses.is_dataclass(c)


def test_preset_best_through_the_cli(tmp_path, monkeypatch):
    """--preset best: restorative LoRA, learning, then end-to-end tuning (here over 8
    sequences per epoch: the 4 calibration rows and 4 more); the export is the tuned layers,
    so ORT still equals the PyTorch reference exactly (the pipeline's parity check), and the
    config in the report says what ran."""
    import json

    from qexport import api, cli
    from tiny_models import tiny_llama

    seen = []

    def recording(module, packed, ids, *args, **kwargs):
        seen.append(ids.clone())
        return tune_end_to_end(module, packed, ids, *args, **kwargs)

    monkeypatch.setattr(api, "tune_end_to_end", recording)
    src = tmp_path / "llama"
    tiny_llama().save_pretrained(src)
    out = tmp_path / "out"
    assert cli.main([str(src), "-o", str(out), "--calib-samples", "4", "--calib-seqlen", "32",
                     "--preset", "best", "--e2e-samples", "8", "--no-perplexity", "--threads",
                     "1", "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["parity"]["ok"] and "e2e_tune" in report["timings"]
    # the tuning got 8 distinct sequences, and the report says so
    assert len(seen) == 1 and seen[0].shape == (8, 32)
    assert len({tuple(r.tolist()) for r in seen[0]}) == 8
    assert report["calibration"]["end_to_end"] == {"sequences": 8, "per_epoch": 8}
    # the tuned norm weights are in both graphs (the KV-cache decoder's rebuilt with them)
    import onnx
    from onnx import numpy_helper

    def values(name):
        model = onnx.load(out / name)  # with its external data
        return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}

    tuned = {k: v for k, v in values("model.onnx").items() if k.startswith("qexport_e2e_")}
    assert len(tuned) == 2 * 2 + 1  # two norms per block, the final one
    past = [v.tobytes() for v in values("model_with_past.onnx").values()]
    for name, value in tuned.items():
        assert value.tobytes() in past, name
        assert not np.all(value == 1.0), name  # moved from the initial ones
    assert report["config"]["e2e"]["epochs"] == 1 and report["config"]["e2e"]["n_samples"] == 8
    assert report["config"]["preprocess"] == "restorative_lora" and \
        report["config"]["preprocess_config"]["rank"] == 64 and "preprocess" in report["timings"]


def test_e2e_epochs_flag():
    from qexport import cli

    def e2e(*argv):
        return cli.run_config(cli.build_parser().parse_args(["m", *argv])).quantize.e2e

    def lora(*argv):
        return cli.run_config(cli.build_parser().parse_args(["m", *argv])).quantize.preprocess

    assert lora() is None and lora("--preset", "best").config.rank == 64
    assert lora("--preset", "best", "--no-lora") is None
    assert lora("--lora").config.salient_ratio == 0.2 and lora("--lora").config.rank == 64
    assert lora("--lora", "--salient-ratio", "0.1").config.salient_ratio == 0.1
    assert lora("--lora", "--scheme", "w4a16") is None  # nothing binary to prepare for
    assert e2e().epochs == 1 and e2e().n_samples is None  # the calibration rows
    assert e2e("--preset", "best").epochs == 1 and e2e("--preset", "best").n_samples == 192
    assert e2e("--preset", "fast") is None
    assert e2e("--e2e-epochs", "3").epochs == 3 and e2e("--preset", "best", "--e2e-epochs",
                                                        "0") is None
    assert e2e("--e2e-samples", "100").n_samples == 100
    with pytest.raises(QexportError, match="--e2e-samples needs end-to-end tuning"):
        e2e("--preset", "fast", "--e2e-samples", "100")


def test_e2e_reads_further_calibration_text(tmp_path):
    """End-to-end tuning asking for more sequences than the calibration rows reads the text's
    next ones (the calibration rows first); a text too short for them gives what it has, and
    the tuning repeats those to keep its steps."""
    from qexport import cli, models
    from qexport.pipeline import _load_data
    from tiny_models import save_with_tokenizer, tiny_llama

    src = save_with_tokenizer(tiny_llama(), tmp_path / "m")
    lm = models.load_model(str(src))
    text = tmp_path / "text.txt"

    def load(words, *argv):
        text.write_text(" ".join(f"w{i}" for i in range(words)))
        config = cli.run_config(cli.build_parser().parse_args(
            [str(src), "--calib", str(text), "--calib-samples", "4", "--calib-seqlen", "16",
             "--no-perplexity", *argv]))
        return _load_data(config, lm)

    got = load(2000, "--e2e-samples", "12")
    assert len(got.calib) == 4 and len(got.tune) == 12
    assert all(torch.equal(a[0], b[0]) for a, b in zip(got.calib, got.tune))
    assert len({tuple(b[0].flatten().tolist()) for b in got.tune}) == 12
    assert load(2000).tune is None  # the default preset tunes on the calibration rows
    short = load(40, "--e2e-samples", "50")  # 149 characters, one token each: 9 of 16
    assert len(short.calib) == 4 and len(short.tune) == len(text.read_text()) // 16 == 9

    model, ids, path, packed = _tiny_learned(4, 1, LearnConfig(epochs=1))
    said = []
    tune_end_to_end(model, packed, ids[:3], E2EConfig(n_samples=7, log_every=1),
                    progress=said.append)
    assert "3 sequences for 7 per epoch: they repeat" in said[0]
    assert any("7 steps" in s for s in said)
    with pytest.raises(QexportError, match="n_samples >= 1"):
        tune_end_to_end(model, packed, ids, E2EConfig(n_samples=0))


def test_distillation_off_for_models_without_a_language_model_head():
    """End-to-end tuning and LoRA distil next-token distributions: an encoder gets neither,
    and a note says why; a causal LM keeps both."""
    import types

    from qexport import cli
    from qexport.pipeline import _with_distillation

    config = cli.run_config(cli.build_parser().parse_args(["m", "--preset", "best"]))
    assert config.quantize.e2e is not None and config.quantize.preprocess is not None
    encoder = types.SimpleNamespace(is_causal_lm=False)
    off, note = _with_distillation(config, encoder)
    assert off.quantize.e2e is None and off.quantize.preprocess is None
    assert "restorative LoRA and end-to-end tuning skipped" in note
    same, none = _with_distillation(config, types.SimpleNamespace(is_causal_lm=True))
    assert same is config and none is None
    fast = cli.run_config(cli.build_parser().parse_args(["m", "--preset", "fast"]))
    assert _with_distillation(fast, encoder) == (fast, None)
