"""The public API: quantize, export, then run the file with ONNX Runtime and the op library."""
import sys

import numpy as np
import torch

import qexport
from qexport import native
from qexport.check import compare
from qexport.ptq161 import LearnConfig
from tiny_models import LogitsOnly, tiny_opt


def test_import_is_light():
    import subprocess
    code = "import sys, qexport; qexport.parse_scheme('w1a16'); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_quantize_export_run(tmp_path):
    module = LogitsOnly(tiny_opt())
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    calib = [(torch.randint(0, 128, (1, 32), generator=torch.Generator().manual_seed(i)),)
             for i in range(2)]
    config = qexport.QuantizeConfig(qexport.parse_scheme("w1.61a16"), method="ptq161",
                                    learn=LearnConfig.preset("fast"))
    qm = qexport.quantize(module, (ids,), calib, config)
    # The CLI's defaults: 12 block Linears learned, and the head at 4 bits (w4a16).
    assert "learn_scales" in qm.timings and len(qm.packed) == 13 and "model.lm_head" in qm.packed
    files = qexport.export(qm, tmp_path / "model.onnx")
    session = native.make_session(files[0])
    test_ids = torch.randint(0, 128, (3, 5))
    got = session.run(None, {session.get_inputs()[0].name: test_ids.numpy()})[0]
    with torch.no_grad():
        ref = qm.graph_module(test_ids).numpy()
    m = compare(got, ref, top1=True)
    assert m["cosine"] > 0.99999 and m["top1_agreement"] == 1.0
    assert np.isfinite(got).all()


def test_export_writes_rmsnorm_that_onnxruntime_fuses(tmp_path):
    """torch.rsqrt exports as Reciprocal(Sqrt); export_onnx writes x / Sqrt(v) instead, the
    RMSNorm form ONNX Runtime fuses into SimplifiedLayerNormalization (one node per norm)."""
    import onnx
    import onnxruntime as ort

    from qexport.onnx_export import export_onnx, trace
    from qexport.families.attention import fused_attention
    from tiny_models import tiny_llama

    module = LogitsOnly(tiny_llama())
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    gm = trace(module, (ids,), swap=fused_attention)
    export_onnx(gm, (ids,), tmp_path / "fp.onnx", metadata={}, input_names=["input_ids"])
    ops = [n.op_type for n in onnx.load(tmp_path / "fp.onnx").graph.node]
    assert "Reciprocal" not in ops and ops.count("Div") >= 5  # 2 layers x 2 norms + final
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    session = ort.InferenceSession(str(tmp_path / "fp.onnx"), options,
                                   providers=["CPUExecutionProvider"])
    fused = [n.op_type for n in onnx.load(tmp_path / "optimized.onnx").graph.node]
    assert fused.count("SimplifiedLayerNormalization") == 5, sorted(set(fused))
    got = session.run(None, {"input_ids": ids.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, module(ids).numpy(), rtol=1e-4, atol=1e-4)
