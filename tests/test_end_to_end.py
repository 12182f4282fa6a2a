"""End to end through the CLI: tiny random-init models (Llama, OPT) and the real SmolLM2-135M."""
import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest

from qexport import contract as C
from qexport.ops.binary_mixed_linear import contract as B
from test_cli import run_cli


def _node_layers(node):
    """The layers a qexport node computes: its name, or those its stacking metadata lists."""
    meta = {p.key: p.value for p in node.metadata_props}
    if C.META_NODE_LAYERS in meta:
        return [layer for layer, _ in json.loads(meta[C.META_NODE_LAYERS])]
    return [node.name]


def _check_folder(out, scheme, stacked=True):
    report = json.loads((out / "report.json").read_text())
    model = onnx.load(out / "model.onnx")
    onnx.checker.check_model(model)
    q_nodes = [n for n in model.graph.node if n.domain == C.DOMAIN]
    assert q_nodes and all(n.op_type == B.OP_NAME for n in q_nodes)
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta[C.META_SCHEME] == scheme and meta[C.META_CONTRACT] == str(C.CONTRACT_VERSION)
    assert json.loads(meta[C.META_CONFIG])["scheme"] == scheme
    assert (out / "libqexport_ops.so").exists() and (out / "report.md").exists()
    assert report["parity"]["ok"]
    n_head = report["bits"].get("head", {}).get("quantized_linears", 0)
    layers = [layer for n in q_nodes for layer in _node_layers(n)]
    assert len(layers) == report["bits"]["quantized_linears"] + n_head == len(report["layers"])
    assert sorted(layers) == sorted(r["layer"] for r in report["layers"])
    # q/k/v read one activation with one salient mask: stacked (fuse_shared_input) unless
    # PTQ1.61 learned an r2 per Linear (--no-share-r2, or the best preset)
    assert any(n.name.endswith("q_proj+k_proj+v_proj") for n in q_nodes) == stacked
    # a stacked q/k/v feeds the fused attention packed, without a split (passes.pack_qkv)
    producer = {o: n for n in model.graph.node for o in n.output}
    attention = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    for n in attention:
        packed = producer[n.input[0]].name.endswith("q_proj+k_proj+v_proj")
        assert packed == stacked and (list(n.input[1:3]) == ["", ""]) == packed
    assert all(r["parity"]["ok"] for r in report["layers"])
    speed = report["speed"]  # latencies: present and positive (their values are the machine's)
    assert all(speed[k]["ort_ms"] > 0 and speed[k]["torch_fp32_ms"] > 0
               for k in ("one_token", "prompt"))
    assert "## Speed (this machine)" in (out / "report.md").read_text()
    return report


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("scheme,extra", [
    pytest.param("w1.61a16", [], id="w1.61a16"),
    pytest.param("w1a16", [], id="w1a16"),
    pytest.param("w4a16", [], id="w4a16"),
    pytest.param("w1.61a16", ["--method", "closed-form"], id="w1.61a16-closed-form"),
    pytest.param("w1.61a16", ["--outlier-suppression", "--method", "closed-form",
                              "--os-quantile", "0.9"], id="w1.61a16-os-quantile"),
    pytest.param("w1.61a16", ["--outlier-suppression"], id="w1.61a16-os-ptq161"),
    pytest.param("w1.61a16", ["--head-scheme", "none", "--no-embeddings-fp16"],
                 id="w1.61a16-fp-head"),
    pytest.param("w1.61a16", ["--no-share-r2"], id="w1.61a16-r2-per-linear"),
])
def test_tiny_models_end_to_end(tmp_path, family, scheme, extra):
    from tiny_models import tiny_llama, tiny_opt
    src = tmp_path / family
    (tiny_llama if family == "llama" else tiny_opt)().save_pretrained(src)
    out = tmp_path / "out"
    proc = run_cli(src, "--scheme", scheme, "-o", out, "--calib-samples", "2",
                   "--calib-seqlen", "32", *extra)
    assert proc.returncode == 0, proc.stderr
    stacked = "--no-share-r2" not in extra
    report = _check_folder(out, scheme, stacked)
    e2e = report["end_to_end"]["parity"]
    assert e2e["cosine"] >= 0.999 and e2e["top1_agreement"] >= 0.99
    assert report["perplexity_skipped"]  # no tokenizer: said so, not silently dropped
    fp_head = "none" in extra  # by default the head is 4-bit and the embeddings fp16
    assert report["bits"].get("head", {}).get("quantized_linears", 0) == (0 if fp_head else 1)
    assert ("head_hessian" in report["timings"]) != fp_head  # its 4-bit codes came from GPTQ
    assert any(init.data_type == onnx.TensorProto.FLOAT16 and list(init.dims) == [128, 64]
               for init in onnx.load(out / "model.onnx").graph.initializer) != fp_head  # table
    # Running it again replaces its own output folder.
    assert run_cli(src, "--scheme", scheme, "-o", out, "--calib-samples", "1",
                   "--calib-seqlen", "16", *extra).returncode == 0
    # The python sample runs the folder and checks it against the saved reference.
    sample = subprocess.run([sys.executable, "samples/01_python_ort/run.py", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert sample.returncode == 0, sample.stdout + sample.stderr


@pytest.mark.slow
def test_smollm2_end_to_end(tmp_path):
    pytest.importorskip("gguf", reason="the example needs gguf (pip install gguf accelerate)")
    from qexport import models
    try:
        models.example_gguf_path()
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"example model package not installed: {e}")
    out = tmp_path / "out"
    # The fast preset on a smaller calibration set keeps CI within budget; docs/results.md has
    # the default preset's numbers.
    proc = run_cli("smollm2-135m", "--scheme", "w1.61a16", "-o", out, "--eval-tokens", "2048",
                   "--preset", "fast", "--calib-samples", "16", "--calib-seqlen", "256",
                   timeout=2400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = _check_folder(out, "w1.61a16")
    assert report["bits"]["bits_per_weight"] <= 1.75
    e2e = report["end_to_end"]["parity"]
    assert e2e["cosine"] >= 0.999 and e2e["top1_agreement"] >= 0.99
    ppl = report["perplexity"]
    assert ppl["fp"] < 100 and np.isfinite(ppl["quantized_ort"])
    assert abs(ppl["quantized_ort"] / ppl["quantized_torch"] - 1) < 0.005
    # Learned scales: far better than the closed form's ~2e4 (docs/results.md).
    assert ppl["quantized_torch"] < 5000
    _generation_agrees(out)


def _generation_agrees(out, prompt="The capital of France is", new=24):
    """`qexport generate` streams text from the folder; onnxruntime-genai, with its own
    tokenizer reading the folder's tokenizer.json, encodes the prompt to the same ids and
    generates the same greedy tokens and text."""
    import importlib.util

    from qexport.generate import Generator, load_tokenizer
    from qexport.serving import stop_tokens

    proc = run_cli("generate", out, "--prompt", prompt, "--max-new-tokens", str(new))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(prompt) and len(proc.stdout) > len(prompt) + 8, proc.stdout
    assert "time to first token" in proc.stderr and "tokens/s" in proc.stderr
    tokenizer = load_tokenizer(out)
    ids = tokenizer(prompt)["input_ids"]
    ours = list(Generator(out).generate(ids, new, stop=stop_tokens(out, tokenizer)))
    assert proc.stdout.rstrip("\n") == prompt + tokenizer.decode(ours, skip_special_tokens=True)
    if importlib.util.find_spec("onnxruntime_genai") is None:
        pytest.skip("onnxruntime-genai is not installed (the test extra installs it)")
    import onnxruntime_genai as og
    model = og.Model(str(out))
    og_tokenizer = og.Tokenizer(model)
    assert list(og_tokenizer.encode(prompt)) == ids
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + new, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(og_tokenizer.encode(prompt))
    theirs = []
    while not generator.is_done():
        generator.generate_next_token()
        theirs.append(int(generator.get_next_tokens()[0]))
    assert theirs == ours
    assert og_tokenizer.decode(theirs) == tokenizer.decode(ours, skip_special_tokens=True)


def test_pt2_archive_end_to_end(tmp_path):
    import torch
    from tiny_models import LogitsOnly, tiny_llama
    module = LogitsOnly(tiny_llama())
    ids = torch.randint(0, 128, (2, 8))
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq", max=256)}
    ep = torch.export.export(module, (ids,), dynamic_shapes=(dims,))
    src = tmp_path / "tiny.pt2"
    torch.export.save(ep, src)
    out = tmp_path / "out"
    proc = run_cli(src, "-o", out, "--calib-samples", "2", "--calib-seqlen", "16")
    assert proc.returncode == 0, proc.stderr
    # A flat exported graph has no blocks to learn on: closed form (so q/k/v stack), and the
    # report says so.
    report = _check_folder(out, "w1.61a16")
    assert "closed-form scales used" in report["notes"]["learn_scales"][0]


def test_trusted_pickle_end_to_end(tmp_path):
    import torch
    from tiny_models import LogitsOnly, tiny_opt
    src = tmp_path / "tiny.pt"
    torch.save(LogitsOnly(tiny_opt()), src)
    out = tmp_path / "out"
    env_path = os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-m", "qexport.cli", str(src), "--trust-pickle",
                           "-o", str(out), "--calib-samples", "2", "--calib-seqlen", "16"],
                          capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=env_path))
    assert proc.returncode == 0, proc.stderr
    _check_folder(out, "w1.61a16")


@pytest.mark.parametrize("family,extra", [("llama", ["--no-share-r2"]), ("opt", []),
                                          ("opt", ["--outlier-suppression"])])
def test_tokenizer_model_perplexity_and_eval(tmp_path, family, extra):
    """A tiny model with a tokenizer: calibration from --calib text, perplexity in the report,
    then `qexport eval` rebuilds the PyTorch quantized model from the export's packed weights
    (split per layer where projections were stacked; after OS+, with its folded norms) and
    agrees with ONNX Runtime."""
    from tiny_models import save_with_tokenizer, tiny_llama, tiny_opt
    src = save_with_tokenizer((tiny_llama if family == "llama" else tiny_opt)(), tmp_path / "m")
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"word{i % 97} and more text {i}." for i in range(3000)))
    out = tmp_path / "out"
    proc = run_cli(src, "-o", out, "--calib", text, "--eval", text, "--calib-samples", "4",
                   "--calib-seqlen", "64", "--eval-tokens", "512", "--eval-window", "128",
                   "--embeddings-fp16", *extra)
    assert proc.returncode == 0, proc.stderr
    report = _check_folder(out, "w1.61a16", stacked="--no-share-r2" not in extra)
    ppl = report["perplexity"]
    assert abs(ppl["quantized_ort"] / ppl["quantized_torch"] - 1) < 0.005
    proc = run_cli("eval", out, "--eval", text, "--eval-tokens", "512", "--eval-window", "128")
    assert proc.returncode == 0, proc.stderr
    values = {line.split()[0]: float(line.split()[1]) for line in proc.stdout.splitlines()
              if line.startswith("  ") and line.split()[0] in ("fp", "quantized_torch",
                                                                "quantized_ort")}
    assert values["quantized_torch"] == pytest.approx(ppl["quantized_torch"], abs=1e-3)
    assert values["quantized_ort"] == pytest.approx(ppl["quantized_ort"], abs=1e-3)
    assert values["fp"] == pytest.approx(ppl["fp"], abs=1e-3)


def test_kv_cache_export(tmp_path):
    """--kv-cache: model_with_past.onnx beside model.onnx, checked (prompt, then tokens one by
    one) against the PyTorch reference; a model it cannot take is refused before quantizing."""
    from test_cli import assert_one_line_error
    from tiny_models import tiny_causal_lm, tiny_llama
    tiny_llama().save_pretrained(tmp_path / "llama")
    out = tmp_path / "out"
    proc = run_cli(tmp_path / "llama", "-o", out, "--calib-samples", "2", "--calib-seqlen", "32",
                   "--kv-cache")
    assert proc.returncode == 0, proc.stderr
    report = _check_folder(out, "w1.61a16")
    kv = report["end_to_end"]["kv_cache"]
    assert check_parity(kv["parity"]) and "model_with_past.onnx" in report["files"]
    decoded = report["speed"]["decoded_token"]
    assert decoded["ort_ms"] > 0 and decoded["tokens"] == 16
    assert decoded["cached_tokens"] + 16 == report["speed"]["prompt_tokens"]
    names = [i.name for i in onnx.load(out / "model_with_past.onnx").graph.input]
    assert names == ["input_ids", "attention_mask"] + [
        f"past.{i}.{kv}" for i in range(2) for kv in ("key", "value")]
    sample = subprocess.run([sys.executable, "samples/01_python_ort/run.py", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert sample.returncode == 0 and "KV cache" in sample.stdout, sample.stdout + sample.stderr
    tiny_causal_lm("bert").save_pretrained(tmp_path / "bert")  # an encoder: no KV cache
    assert_one_line_error(run_cli(tmp_path / "bert", "-o", tmp_path / "o2", "--kv-cache"),
                          "--kv-cache")
    assert not (tmp_path / "o2").exists()


def check_parity(metrics):
    return metrics["cosine"] >= 0.999 and metrics["top1_agreement"] >= 0.99


def test_read_export_round_trip(tmp_path):
    import torch

    import qexport
    from qexport.artifact import read_export
    from tiny_models import LogitsOnly, tiny_llama
    ids = torch.randint(0, 128, (2, 8))
    qm = qexport.quantize(LogitsOnly(tiny_llama()), (ids,), [(ids[:1],)],
                          qexport.QuantizeConfig(qexport.parse_scheme("w1.61a16-g8")))
    qexport.export(qm, tmp_path / "model.onnx")
    packed, meta, folded = read_export(tmp_path / "model.onnx")
    assert sorted(packed) == sorted(qm.packed)
    for name, w in qm.packed.items():
        for a, b in zip(packed[name].tensors(), w.tensors()):
            assert (a is None and b is None) or torch.equal(a, b)
        assert packed[name].attributes() == w.attributes()
    assert meta[C.META_SCHEME] == "w1.61a16-g8"
    # no OS+: what the graph holds in place of the model's tensors are the norm weights that
    # end-to-end tuning (in the default preset) trained, read back as they were exported
    assert sorted(folded) == sorted(qm.folded) and folded
    assert all(name.endswith("norm.weight") for name in folded)
    for name, attr in qm.folded.items():
        assert torch.equal(folded[name], getattr(qm.graph_module, attr))


def test_eval_errors_are_one_line(tmp_path):
    from test_cli import assert_one_line_error
    assert_one_line_error(run_cli("eval", tmp_path), "no such file")
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"not onnx")
    assert_one_line_error(run_cli("eval", tmp_path), "model.onnx")
