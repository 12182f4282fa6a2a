"""Graph passes: OS+ folding is exact in floating point; replace_linear keeps the function of the
dequantized weights; both on the Llama family (RMSNorm, q/k/v and gate/up sharing inputs) and
OPT (LayerNorm with bias, shift folded into Linear biases)."""
import pytest
import torch

import passes
from qexport import api
from qexport.calibrate import collect_linear_input_stats
from qexport.onnx_export import trace
from qexport.quantizers import quantize_mixed, select_salient
from qexport.schemes import parse_scheme
from tiny_models import LogitsOnly, tiny_llama, tiny_opt

FAMILIES = {"llama": tiny_llama, "opt": tiny_opt}


def _traced(family):
    module = LogitsOnly(FAMILIES[family]())
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    gm = trace(module, (ids,))
    calib = [(torch.randint(0, 128, (1, 32), generator=torch.Generator().manual_seed(i)),)
             for i in range(3)]
    return module, gm, ids, collect_linear_input_stats(gm, calib)


@pytest.mark.parametrize("family", FAMILIES)
def test_fold_outlier_shift_scale_is_exact(family):
    module, gm, ids, stats = _traced(family)
    before = {k: (v.min.clone(), v.max.clone()) for k, v in stats.items()}
    with torch.no_grad():
        ref = module(ids)
    result = passes.fold_outlier_shift_scale(
        gm, stats, choose=lambda st, shift: passes.choose_shift_scale(st, shift, quantile=0.5))
    assert result.modified
    gm = result.graph_module
    gm.recompile()
    expected_norms = 4  # 2 layers × (attention norm, MLP norm)
    assert sum("channels scaled" in n for n in result.notes) == expected_norms, result.notes
    with torch.no_grad():
        out = gm(ids)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    # The statistics now describe the transformed activations: channel ranges shrank.
    changed = [k for k in stats if not torch.equal(stats[k].max, before[k][1])]
    assert changed
    for k in changed:
        half = torch.maximum(stats[k].max.abs(), stats[k].min.abs())
        half_before = torch.maximum(before[k][1].abs(), before[k][0].abs())
        assert float(half.max()) < float(half_before.max())


def test_os_stats_transform_matches_recomputed():
    x = torch.randn(500, 7) * torch.tensor([1, 2, 3, 50, 1, 1, 9.0]) + 3
    st = passes.OutlierStats.empty(7)
    st.update(x)
    z, s = passes.choose_shift_scale(st, use_shift=True, quantile=0.5)
    direct = passes.OutlierStats.empty(7)
    direct.update((x - z) / s)
    t = st.transformed(z, s)
    for field in ("min", "max", "sum", "sumsq"):
        torch.testing.assert_close(getattr(t, field), getattr(direct, field), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_replace_linear_matches_dequantized_weights(family):
    module, gm, ids, stats = _traced(family)
    packed = {}

    def quantizer(name, w, b):
        if "lm_head" in name:
            return None
        return quantize_mixed(w, b, select_salient(stats[name].rms, 0.2), 0)
    result = passes.replace_linear(gm, quantizer, packed)
    gm = result.graph_module
    gm.recompile()
    assert len(packed) == 2 * (7 if family == "llama" else 6)
    qnodes = [n for n in gm.graph.nodes if n.target == torch.ops.qexport.binary_mixed_linear.default]
    assert len(qnodes) == len(packed)
    assert not any(n.target == torch.ops.aten.linear.default and "lm_head" not in str(n.args[1].target)
                   for n in gm.graph.nodes if n.op == "call_function")
    # The same model with every quantized weight replaced by its dequantized fp32 weight.
    ref_module = LogitsOnly(FAMILIES[family]())
    with torch.no_grad():
        for name, w in packed.items():
            ref_module.get_submodule(name).weight.copy_(w.dequantize())
        ref = ref_module(ids)
        out = gm(ids)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_quantize_api_with_outlier_suppression_runs_and_changes_error():
    module = LogitsOnly(tiny_llama())
    ids = torch.randint(0, 128, (2, 12))
    calib = [(torch.randint(0, 128, (1, 32)),) for _ in range(2)]
    cfg = api.QuantizeConfig(parse_scheme("w1.61a16"), outlier_suppression=True, os_quantile=0.5)
    qm = api.quantize(module, (ids,), calib, cfg)
    assert "fold_outlier_shift_scale" in qm.notes and qm.notes["fold_outlier_shift_scale"]
    assert len(qm.packed) == 14
    with torch.no_grad():
        out = qm.graph_module(ids)
    assert out.shape == (2, 12, 128) and torch.isfinite(out).all()
