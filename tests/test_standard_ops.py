"""Exports made of ONNX Runtime's own ops: w8a8/w6a6 as standard QDQ (OS+ on), w4a16 and w2a16
as com.microsoft MatMulNBits. They run in a plain ONNX Runtime session (no op library
registered), the folder holds no library, and they read back into the same packed weights."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from qexport import ops
from qexport.ops.matmul_nbits import from_mixed, quantize_nbits
from qexport.ops.matmul_nbits.packing import pack_bits, unpack_bits
from qexport.ops.qdq_linear import quantize_qdq
from qexport.quantizers import quantize_mixed

from test_cli import assert_one_line_error, run_cli
from tiny_models import save_with_tokenizer, tiny_llama, tiny_opt

BUDGET = ["--calib-samples", "4", "--calib-seqlen", "32", "--eval-tokens", "256",
          "--eval-window", "64", "--threads", "1"]


def _plain_session(model):
    """ONNX Runtime without the qexport library."""
    data = model if isinstance(model, (str, bytes)) else model.SerializeToString()
    return ort.InferenceSession(str(data) if isinstance(data, str) else data,
                                providers=["CPUExecutionProvider"])


def _cosine(a, b):
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


@pytest.mark.parametrize("bits", [2, 4])
def test_pack_bits_round_trip(bits):
    codes = torch.randint(0, 1 << bits, (3, 5, 37), dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.shape == (3, 5, -(-37 * bits // 8))
    assert torch.equal(unpack_bits(packed, bits, 37), codes.int())


@pytest.mark.parametrize("bits,block,k,bias", [(4, 32, 200, True), (2, 64, 128, False),
                                               (4, 16, 48, False)])
def test_matmul_nbits_runs_in_onnx_runtime_as_its_reference(bits, block, k, bias):
    torch.manual_seed(0)
    w = torch.randn(40, k)
    packed = quantize_nbits(w, torch.randn(40) if bias else None, bits, block)
    x = torch.randn(5, k)
    got = _plain_session(ops.single_op_model(packed)).run(None, {"X": x.numpy()[None]})[0][0]
    np.testing.assert_allclose(got, ops.apply(x, packed).numpy(), rtol=1e-4, atol=1e-4)
    # the codes are RTN's: the error shrinks with more bits
    err = ((packed.dequantize() - w).norm() / w.norm()).item()
    assert err < (0.1 if bits == 4 else 0.5)


def test_w4a16_converts_to_matmul_nbits_with_the_same_numbers():
    torch.manual_seed(1)
    w, b = torch.randn(24, 100), torch.randn(24)
    mixed = quantize_mixed(w, b, torch.arange(100, dtype=torch.int32), 32)
    nbits = from_mixed(mixed)
    assert torch.equal(nbits.dequantize(), mixed.dequantize())
    x = torch.randn(3, 100)
    torch.testing.assert_close(ops.apply(x, nbits), ops.apply(x, mixed))
    stacked = type(nbits).stack([nbits.rows(0, 7), nbits.rows(7, 24)])
    assert torch.equal(stacked.dequantize(), nbits.dequantize())
    with pytest.raises(ValueError, match="all-4-bit"):
        from_mixed(quantize_mixed(w, b, torch.arange(20, dtype=torch.int32), 32))


@pytest.mark.parametrize("wbits,abits", [(8, 8), (6, 6)])
def test_qdq_linear_lowers_to_standard_ops(wbits, abits, tmp_path):
    torch.manual_seed(2)
    w, b = torch.randn(32, 64), torch.randn(32)
    x = 3 * torch.randn(2, 7, 64)
    packed = quantize_qdq(w, b, float(x.min()), float(x.max()), wbits, abits)
    assert int(packed.w_q.abs().max()) <= (1 << (wbits - 1)) - 1
    model = ops.single_op_model(packed)
    types = [n.op_type for n in model.graph.node]
    assert "QuantizeLinear" in types and not any(n.domain for n in model.graph.node)
    assert ("Clip" in types) == (abits < 8)  # 6-bit activations: clipped to 64 levels
    assert [o.domain for o in model.opset_import] == [""]
    # ONNX Runtime runs it on its integer kernel (the QDQ MatMul fusion)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    fused = [n.op_type for n in onnx.load(tmp_path / "optimized.onnx").graph.node]
    assert "MatMulIntegerToFloat" in fused and "DequantizeLinear" not in fused, fused
    session = _plain_session(model)
    got = session.run(None, {"X": x.numpy()})[0]
    ref = ops.apply(x, packed).numpy()
    assert _cosine(got, ref) > 0.999999 and np.abs(got - ref).max() < 1e-3
    # the activation is really quantized: 2^abits levels at most
    from qexport.ops.qdq_linear import fake_quant
    levels = fake_quant(x, packed.x_scale, packed.x_zero, packed.act_qmin, packed.act_qmax)
    assert levels.unique().numel() <= 1 << abits
    # the lowered MatMul reads back as the op
    anchor = next(n for n in model.graph.node if n.op_type == "MatMul")
    node = ops.raised(anchor)
    assert (node.domain, node.op_type) == ("qexport", "QDQLinear")
    assert {a.name: a.i for a in node.attribute} == packed.attributes()


def test_w8a8_export_needs_no_library(tmp_path):
    """A tiny Llama (RMSNorm: OS+ scales only) at w8a8 with the defaults: QDQ nodes only,
    OS+ on, parity ≥ 0.999 through a plain ONNX Runtime, no library in the folder, the
    KV-cache decoder and genai_config without a custom op library, `qexport eval` agrees."""
    src = save_with_tokenizer(tiny_llama(), tmp_path / "llama")
    out = tmp_path / "out"
    proc = run_cli(src, "--scheme", "w8a8", "-o", out, *BUDGET)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["parity"]["ok"] and report["end_to_end"]["parity"]["cosine"] >= 0.999
    assert report["op_library"] is False and report["config"]["outlier_suppression"] is True
    assert report["config"]["head_scheme"] == "w8a8"
    assert not (out / "libqexport_ops.so").exists()
    assert "no op library needed" in (out / "report.md").read_text()
    assert "(model.onnx, no op library needed, report.md)" in proc.stderr
    model = onnx.load(out / "model.onnx")
    types = [n.op_type for n in model.graph.node]
    assert types.count("QuantizeLinear") >= 4 and "qexport" not in {n.domain for n in model.graph.node}
    ref = np.load(out / "reference.npz")
    got = _plain_session(str(out / "model.onnx")).run(None, {"input_ids": ref["input_ids"]})[0]
    assert _cosine(got, ref["logits"]) >= 0.999
    genai = json.loads((out / "genai_config.json").read_text())
    assert "custom_ops_library" not in genai["model"]["decoder"]["session_options"]
    _plain_session(str(out / "model_with_past.onnx"))  # loads without the library
    tr = run_cli("triton", out, "-o", tmp_path / "repo")
    assert tr.returncode == 0, tr.stderr
    for name in ("qexport", "qexport_decoder"):
        assert "model_operations" not in (tmp_path / "repo" / name / "config.pbtxt").read_text()
        assert not (tmp_path / "repo" / name / "1" / "libqexport_ops.so").exists()
    ev = run_cli("eval", out, "--eval-tokens", "256", "--eval-window", "64", "--threads", "1")
    assert ev.returncode == 0, ev.stderr[-2000:]  # 0: ORT and PyTorch perplexities agree
    assert "quantized_ort" in ev.stdout and "ORT vs PyTorch quantized" in ev.stdout


def test_w6a6_opt_shift_and_scale(tmp_path):
    """OPT (LayerNorm with a bias): w6a6 folds both the OS+ shift and scale; parity holds."""
    src = tmp_path / "opt"
    tiny_opt().save_pretrained(src)
    out = tmp_path / "out"
    proc = run_cli(src, "--scheme", "w6a6", "-o", out, "--no-perplexity", *BUDGET)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["parity"]["ok"] and report["op_library"] is False
    model = onnx.load(out / "model.onnx")
    assert "Clip" in [n.op_type for n in model.graph.node]
    folded = json.loads({p.key: p.value for p in model.metadata_props}["qexport.os_folded"])
    assert any(k.endswith("bias") for k in folded), folded  # the shift went into norm biases


@pytest.mark.parametrize("scheme,bits,target", [("w4a16", 4, ["--target", "ort-std"]),
                                               ("w2a16", 2, [])])
def test_matmul_nbits_export(tmp_path, scheme, bits, target):
    """w4a16 for the library-free target, w2a16 (library-free whatever the target): every
    Linear a MatMulNBits node."""
    src = tmp_path / "llama"
    tiny_llama().save_pretrained(src)
    out = tmp_path / "out"
    proc = run_cli(src, "--scheme", scheme, *target, "-o", out, "--no-perplexity", *BUDGET)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["parity"]["ok"] and report["op_library"] is False
    assert not (out / "libqexport_ops.so").exists()
    assert report["bits"]["quantized_linears"] == 2 * 7 and "head" in report["bits"]
    graph = onnx.load(out / "model.onnx").graph
    nodes = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert nodes and "qexport" not in {n.domain for n in graph.node}
    assert {a.i for n in nodes for a in n.attribute if a.name == "bits"} == (
        {2, 4} if bits == 2 else {4})  # w2a16's head: w4a16 (MatMulNBits too)


def test_binary_scheme_for_the_library_free_target_is_refused(tmp_path):
    src = tmp_path / "llama"
    tiny_llama().save_pretrained(src)
    assert_one_line_error(run_cli(src, "--target", "ort-std", "-o", tmp_path / "o"),
                          "w1.61a16", "binary weights")
    assert not (tmp_path / "o").exists()
    assert_one_line_error(run_cli(src, "--scheme", "w8a8-g64", "-o", tmp_path / "o"),
                          "-g does not apply")


def test_os_plus_says_why_a_post_norm_model_is_not_folded():
    """BERT's LayerNorms come after the residual add and feed the next residual too: OS+
    cannot scale them, and the notes say so rather than pretending it ran."""
    from qexport import api
    from qexport.config import QuantizeConfig
    from qexport.schemes import parse_scheme
    from tiny_models import tiny_causal_lm

    model = tiny_causal_lm("bert").eval()
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    config = QuantizeConfig(parse_scheme("w8a8"))
    assert config.outlier_suppression is True  # on by default for activation schemes
    qm = api.quantize(model, (ids,), [(ids[:1],), (ids[1:],)], config)
    notes = qm.notes["fold_outlier_shift_scale"]
    assert any("not folded" in n and "post-norm residual" in n for n in notes), notes
