"""Graph passes: OS+ folding is exact in floating point; replace_linear keeps the function of the
dequantized weights; both on the Llama family (RMSNorm, q/k/v and gate/up sharing inputs) and
OPT (LayerNorm with bias, shift folded into Linear biases)."""
import pytest
import torch

import passes
from qexport import api
from qexport.graph import layers_of
from qexport.outlier import OutlierStats, choose_shift_scale, search_shift_scale
from qexport.calibrate import collect_linear_input_stats
from qexport.onnx_export import trace
from qexport.quantizers import quantize_mixed, select_salient
from qexport.schemes import parse_scheme
from tiny_models import LogitsOnly, tiny_llama, tiny_opt

FAMILIES = {"llama": tiny_llama, "opt": tiny_opt}


def _calib(n=3):
    return [(torch.randint(0, 128, (1, 32), generator=torch.Generator().manual_seed(i)),)
            for i in range(n)]


def _traced(family, sample_tokens=0):
    module = LogitsOnly(FAMILIES[family]())
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    gm = trace(module, (ids,))
    return module, gm, ids, collect_linear_input_stats(gm, _calib(), sample_tokens=sample_tokens)


def _odd_mask_quantizer(stats, odd):
    """w1.61 closed form for every Linear but the head; `odd` gets another salient ratio, so
    its mask differs from its siblings' (it does not stack with them)."""
    def quantizer(name, w, b):
        if "lm_head" in name:
            return None
        ratio = 0.3 if name == odd else 0.2
        return quantize_mixed(w, b, select_salient(stats[name].rms, ratio), 0)
    return quantizer


def _run_pass(fn, gm, inputs, tol):
    """(result, gm) of pass `fn` on gm, after checking the outputs stayed within `tol`."""
    with torch.no_grad():
        before = gm(*inputs)
    result = fn(gm)
    gm = result.graph_module
    gm.graph.lint()
    gm.graph.eliminate_dead_code()
    gm.recompile()
    with torch.no_grad():
        torch.testing.assert_close(gm(*inputs), before, rtol=tol, atol=tol)
    return result, gm


def _quantile(q):
    return lambda st, shift, weights: choose_shift_scale(st, shift, quantile=q)


@pytest.mark.parametrize("family", FAMILIES)
def test_fold_outlier_shift_scale_is_exact(family):
    module, gm, ids, stats = _traced(family)
    before = {k: (v.min.clone(), v.max.clone()) for k, v in stats.items()}
    with torch.no_grad():
        ref = module(ids)
    folded = {}
    result = passes.fold_outlier_shift_scale(gm, stats, choose=_quantile(0.5), folded=folded)
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
    # `folded` lets the eager module follow: with those tensors it computes what gm computes.
    assert any("norm" in k for k in folded) and all(hasattr(gm, a) for a in folded.values())
    state = {k: v.clone() for k, v in module.state_dict().items()}
    with api.folded_into(module, {k: getattr(gm, a) for k, a in folded.items()}), \
            torch.no_grad():
        torch.testing.assert_close(module(ids), out, rtol=1e-4, atol=1e-4)
        assert not torch.equal(module.state_dict()[next(iter(folded))], state[next(iter(folded))])
    after = module.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)


@pytest.mark.parametrize("family", FAMILIES)
def test_calibration_shares_stats_and_samples_only_norm_outputs(family):
    _, gm, _, stats = _traced(family, sample_tokens=30)
    qkv = [v for k, v in stats.items() if k.endswith(("q_proj", "k_proj", "v_proj"))
           and ".layers.0." in k]
    assert len(qkv) == 3 and qkv[0] is qkv[1] is qkv[2]  # one input, recorded once
    assert qkv[0].count == 3 * 32 and qkv[0].sample.shape == (30, 64)  # 10 per batch of 3
    down = [v for k, v in stats.items() if k.endswith(("down_proj", "fc2"))]
    assert down and all(v.sample is None for v in down)  # fed by an activation, not a norm


def _group_error(stats, weights, z, s, ratio=0.2):
    """Summed quantization error of `weights` on the transformed sample (closed-form w1.61)."""
    moved = stats.transformed(z, s)
    total = 0.0
    for w in weights.values():
        ws = w * s[None, :]
        dq = quantize_mixed(ws, None, select_salient(moved.rms, ratio), 0).dequantize()
        total += float((moved.sample @ (dq - ws).T).square().sum())
    return total


def test_os_search_minimises_quantization_error_over_its_grid():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 48, generator=g) * (1 + 20 * (torch.arange(48) % 13 == 0)) + 2
    st = OutlierStats.empty(48)
    st.update(x, sample_rows=400)
    weights = {"a": torch.randn(32, 48, generator=g), "b": torch.randn(16, 48, generator=g)}

    def error(name, w, moved):
        dq = quantize_mixed(w, None, select_salient(moved.rms, 0.2), 0).dequantize()
        return float((moved.sample @ (dq - w).T).square().sum())
    z, s = search_shift_scale(st, True, weights, error, grid=12)
    assert torch.allclose(z.double(), (st.max + st.min) / 2)
    best = _group_error(st, weights, z, s)
    assert best <= _group_error(st, weights, z, torch.ones(48)) + 1e-6  # never worse than s = 1
    for q in (0.5, 0.9, 0.99):  # a quantile's t is off the grid: compare with some slack
        zq, sq = choose_shift_scale(st, True, quantile=q)
        assert best <= _group_error(st, weights, zq, sq) * 1.05, q
    with pytest.raises(ValueError, match="sample"):
        search_shift_scale(OutlierStats.empty(48), True, weights, error)


def test_os_stats_transform_matches_recomputed():
    x = torch.randn(500, 7) * torch.tensor([1, 2, 3, 50, 1, 1, 9.0]) + 3
    st = OutlierStats.empty(7)
    st.update(x)
    z, s = choose_shift_scale(st, use_shift=True, quantile=0.5)
    direct = OutlierStats.empty(7)
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


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_fuse_shared_input_stacks_exactly(family):
    """q/k/v (one input, one salient mask from its stats) stack into one op + split, and so do
    gate/up (Llama); o and down, alone on their inputs, stay. The outputs do not change.
    A Linear whose salient channels differ from its siblings' is left alone."""
    module, gm, ids, stats = _traced(family)
    odd = next(n for n in stats if n.endswith("k_proj"))  # k_proj of layer 0 gets its own mask
    gm = passes.replace_linear(gm, _odd_mask_quantizer(stats, odd)).graph_module
    gm.recompile()
    result, gm = _run_pass(passes.fuse_shared_input, gm, (ids,), tol=0)
    qnodes = [n for n in gm.graph.nodes if n.target == torch.ops.qexport.binary_mixed_linear.default]
    layers = {n.meta["qexport_layer"]: [name for name, _ in layers_of(n)] for n in qnodes}
    layer0 = odd.rsplit(".", 1)[0]
    assert layers[f"{layer0}.q_proj+v_proj"] == [f"{layer0}.q_proj", f"{layer0}.v_proj"]
    assert odd in layers  # alone
    layer1 = layer0.replace(".0.", ".1.")
    assert f"{layer1}.q_proj+k_proj+v_proj" in layers
    if family == "llama":
        assert f"{layer1.replace('self_attn', 'mlp')}.gate_proj+up_proj" in layers
    assert sum(len(v) for v in layers.values()) == 2 * (7 if family == "llama" else 6)
    assert len(result.notes) == (4 if family == "llama" else 2)


def test_pack_qkv_feeds_the_attention_without_a_split():
    """A stacked q/k/v (layer 1) feeds GroupQueryAttention packed, its split gone; layer 0,
    whose k_proj has its own salient mask (q+v stacked, k alone), keeps its three inputs.
    Outputs equal, bit for bit."""
    from qexport import families
    module = LogitsOnly(tiny_llama())
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    gm = trace(module, (ids,), swap=families.detect(module).swap_attention)
    stats = collect_linear_input_stats(gm, _calib())
    odd = next(n for n in stats if n.endswith("layers.0.self_attn.k_proj"))
    gm = passes.replace_linear(gm, _odd_mask_quantizer(stats, odd)).graph_module
    gm = passes.fuse_shared_input(gm).graph_module
    gm.recompile()
    result, gm = _run_pass(passes.pack_qkv, gm, (ids,), tol=0)
    attention = [n for n in gm.graph.nodes
                 if n.target == torch.ops.qexport.group_query_attention.default]
    assert [n.args[1] is None and n.args[2] is None for n in attention] == [False, True]
    assert attention[1].args[0].meta["qexport_layer"].endswith("layers.1.self_attn.q_proj+k_proj+v_proj")
    assert not any(n.target == torch.ops.aten.split_with_sizes.default
                   and n.args[0] is attention[1].args[0] for n in gm.graph.nodes)
    assert result.modified and result.notes == ["packed q/k/v into 1 attention op"]


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_fuse_skip_norm_fuses_each_residual_rms_norm(family):
    """Llama: the 4 residual adds whose sums an RMSNorm reads become skip_rms_norm ops (the
    first norm reads the embeddings, no add: left alone); outputs equal to float rounding.
    OPT's LayerNorms are not RMSNorms: nothing changes."""
    module, gm, ids, _ = _traced(family)
    result, gm = _run_pass(passes.fuse_skip_norm, gm, (ids,), tol=1e-5)
    fused = [n for n in gm.graph.nodes if n.target == torch.ops.qexport.skip_rms_norm.default]
    assert len(fused) == (4 if family == "llama" else 0)
    assert result.modified == (family == "llama")
    if family == "llama":
        assert result.notes == ["fused 4 residual adds into their RMSNorms"]
        assert not any(n.target == torch.ops.aten.rsqrt.default for n in gm.graph.nodes
                       if any(u in fused for u in n.users))


class _ResidualNorm(torch.nn.Module):
    """x + y, then an RMSNorm of the sum in one of several forms (`kind`)."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        dtype = torch.float16 if kind == "fp16_weight" else torch.float32
        self.weight = torch.nn.Parameter(torch.rand(16, dtype=dtype) + 0.5)
        self.proj = torch.nn.Linear(16, 16)

    def forward(self, x):
        s = x + self.proj(x)
        h = s.to(torch.float16).to(torch.float32) if self.kind == "fp16_round_trip" else s
        dims = None if self.kind == "mean_all" else [-1]
        var = h.pow(2).mean(dim=dims, keepdim=True)
        y = h * torch.rsqrt(var + 1e-6)
        return self.proj(self.weight * y) + s  # a float16 weight: promoted to float32


@pytest.mark.parametrize("kind,shape,fused", [
    ("plain", (2, 5, 16), 1), ("plain", (5, 16), 1),
    ("plain", (2, 3, 5, 16), 0),  # ONNX Runtime's op takes 2-D or 3-D addends
    ("fp16_round_trip", (2, 5, 16), 0),  # float16 rounding inside: not the op's math
    ("mean_all", (2, 5, 16), 0),  # a mean over every axis
    ("fp16_weight", (2, 5, 16), 0),
])
def test_fuse_skip_norm_matches_only_its_op(kind, shape, fused):
    """What fuse_skip_norm takes and leaves: the outputs never change beyond float rounding."""
    module = _ResidualNorm(kind)
    x = torch.randn(*shape)
    _, gm = _run_pass(passes.fuse_skip_norm, trace(module, (x,)), (x,), tol=1e-5)
    assert sum(n.target == torch.ops.qexport.skip_rms_norm.default
               for n in gm.graph.nodes) == fused


def test_skip_rms_norm_reference_matches_onnx_runtime(tmp_path):
    """The op's PyTorch body against ONNX Runtime's SkipSimplifiedLayerNormalization, through
    the exporter's translation: the normed sum and the sum."""
    import onnxruntime as ort
    from qexport.onnx_export import export_onnx

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(48))

        def forward(self, a, b):
            return torch.ops.qexport.skip_rms_norm(a, b, self.w, 1e-5)

    m = M()
    a, b = torch.randn(2, 5, 48) * 3, torch.randn(2, 5, 48)
    path = tmp_path / "m.onnx"
    export_onnx(trace(m, (a, b)), (a, b), path, {}, input_names=["a", "b"],
                output_names=["y", "s"])
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    y, s = sess.run(["y", "s"], {"a": a.numpy(), "b": b.numpy()})
    with torch.no_grad():
        ref_y, ref_s = m(a, b)
    torch.testing.assert_close(torch.from_numpy(s), ref_s, rtol=0, atol=0)
    torch.testing.assert_close(torch.from_numpy(y), ref_y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("os_quantile", [0.5, None], ids=["quantile", "search"])
def test_quantize_api_with_outlier_suppression_runs(os_quantile):
    module = LogitsOnly(tiny_llama())
    ids = torch.randint(0, 128, (2, 12))
    cfg = api.QuantizeConfig(parse_scheme("w1.61a16"), outlier_suppression=True,
                             os_quantile=os_quantile, method="closed-form", head_scheme=None)
    qm = api.quantize(module, (ids,), _calib(2), cfg)
    assert "fold_outlier_shift_scale" in qm.notes and qm.notes["fold_outlier_shift_scale"]
    assert len(qm.packed) == 14
    assert all(st.sample is None for st in qm.stats.values())  # dropped after the search
    assert qm.folded and all("norm" in k for k in qm.folded)  # Linears' folds live in packed
    with torch.no_grad():
        out = qm.graph_module(ids)
    assert out.shape == (2, 12, 128) and torch.isfinite(out).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_os_then_ptq161_learns_on_the_folded_model(family):
    """OS+ composed with PTQ1.61: the eager model learned on carries the folded tensors, so
    the exported graph equals that eager model with the learned weights substituted, and the
    user's module is left as it was."""
    from qexport.ptq161 import LearnConfig, substituted_weights
    module = LogitsOnly(FAMILIES[family]())
    state = {k: v.clone() for k, v in module.state_dict().items()}
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    cfg = api.QuantizeConfig(parse_scheme("w1.61a16"), outlier_suppression=True,
                             method="ptq161", learn=LearnConfig.preset("fast", n_samples=2),
                             head_scheme=None, embeddings_fp16=False)
    qm = api.quantize(module, (ids,), _calib(2), cfg)
    assert "learn_scales" not in qm.notes  # learned, not the closed-form fallback
    assert any(pk.r2 is not None for pk in qm.packed.values())
    after = module.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    tensors = {k: getattr(qm.graph_module, a) for k, a in qm.folded.items()}
    if family == "opt":  # shifts went into the q/k/v and fc1 biases, kept in the packed bias
        assert any(pk.bias is not None and not torch.equal(
            pk.bias, module.get_submodule(n).bias) for n, pk in qm.packed.items())
    with api.folded_into(module, tensors), substituted_weights(module, qm.packed), \
            torch.no_grad():
        biases = {n: module.get_submodule(n).bias for n in qm.packed}
        for n, pk in qm.packed.items():
            if pk.bias is not None:
                module.get_submodule(n).bias = torch.nn.Parameter(pk.bias.clone())
        expected = module(ids)
        for n, b in biases.items():
            module.get_submodule(n).bias = b
        torch.testing.assert_close(qm.graph_module(ids), expected, rtol=1e-4, atol=1e-4)


def test_preprocess_hook_replaces_the_module_quantized():
    """The quantization-preprocessing extension point: its module is what gets quantized."""
    import copy
    module = LogitsOnly(tiny_llama())
    ids = torch.randint(0, 128, (2, 12))
    seen = {}

    def double_mlp(m, batches, progress):
        seen["batches"] = len(batches)
        progress("doubling")
        m = copy.deepcopy(m)
        with torch.no_grad():
            for name, p in m.named_parameters():
                if "down_proj" in name:
                    p.mul_(2)
        return m
    cfg = api.QuantizeConfig(parse_scheme("w4a16"), preprocess=double_mlp, method="closed-form")
    qm = api.quantize(module, (ids,), _calib(2), cfg)
    assert seen["batches"] == 2 and cfg.as_dict()["preprocess"] == "double_mlp"
    name = "model.model.layers.0.mlp.down_proj"
    torch.testing.assert_close(qm.fp_weights[name][0], 2 * module.get_submodule(name).weight)
