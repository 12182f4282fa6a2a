"""Quantization baselines (qexport.baselines): storage formulas, equivalences, GPTQ compensation."""
from __future__ import annotations

import math

import pytest
import torch

from qexport.baselines import (BASELINES, NEEDS_HESSIAN, FakeQuantized, billm, binarize_rows,
                               pbllm, rtn)
from qexport.gptq import linear_input_hessians
from qexport.ptq161 import substituted_weights
from qexport.quantizers import quantize_mixed


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _problem(n=64, k=256, seed=0):
    """W [N, K] with a few outlier input columns; X [T, K] correlated (rank 64 + noise, as
    activations are), with a few loud channels; H = 2·XᵀX/T."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    w[:, [3, 70, 200 % k]] *= 8
    x = (torch.randn(1024, 64, generator=g) @ torch.randn(64, k, generator=g) / 8
         + 0.3 * torch.randn(1024, k, generator=g))
    x[:, [5, 70]] *= 6
    return w, x, 2 * x.T @ x / x.shape[0]


def _out_err(x, w, fq):
    return float((x @ (fq.weight - w).T).norm())


@pytest.mark.parametrize("n,k,expected", [
    # codes N·K·2 bits + scales N·G fp16 + zeros N·G·2 bits, G = ceil(K/64)
    (64, 256, 64 * 256 // 4 + 64 * 4 * 2 + 64 * 4 * 2 // 8),  # 4096 + 512 + 64 = 2.28125 bits
    (48, 200, 48 * 200 // 4 + 48 * 4 * 2 + 48 * 4 * 2 // 8),  # last group of 8 columns
])
def test_rtn_w2_g64_bytes_and_grid(n, k, expected):
    w, _, _ = _problem(n, k)
    fq = BASELINES["rtn2"](w, None, None)
    assert fq.nbytes == expected
    if k == 256:
        assert fq.bits_per_weight() == pytest.approx(2 + 16 / 64 + 2 / 64)
    for g0 in range(0, k, 64):  # every group: at most 4 levels, error within half a step
        grp, q = w[:, g0:g0 + 64], fq.weight[:, g0:g0 + 64]
        step = (grp.amax(1).clamp(min=0) - grp.amin(1).clamp(max=0)) / 3
        assert all(len(torch.unique(r)) <= 4 for r in q)
        assert bool(((grp - q).abs() <= step[:, None] * 0.5 + 1e-3 * step[:, None]).all())


@pytest.mark.parametrize("n,k", [(64, 256), (48, 200)])
def test_w1_is_our_format_without_salient_channels(n, k):
    w, _, _ = _problem(n, k)
    bias = torch.randn(n)
    fq = binarize_rows(w, bias, None)
    pk = quantize_mixed(w, bias, torch.zeros(0, dtype=torch.int32), 0)
    assert torch.equal(fq.weight, pk.dequantize())
    assert fq.nbytes == pk.weight_nbytes() == n * (math.ceil(k / 8) + 2 + 2)
    assert 1.0 < fq.bits_per_weight() <= 1 + 32 / k + 8 / k


@pytest.mark.parametrize("frac,bits", [(0.05, 4), (0.1, 8)])
def test_pbllm_bytes_formula(frac, bits):
    w, _, h = _problem()
    n, k = w.shape
    fq = pbllm(w, None, h, salient_frac=frac, salient_bits=bits)
    s = round(frac * n * k)
    mask = min(math.ceil(n * k / 8), 2 * s + 4 * (n + 1))
    assert fq.info["salient"] == s == int(fq.info["salient_mask"].sum())
    assert fq.nbytes == (math.ceil((n * k - s) / 8) + math.ceil(s * bits / 8)
                         + n * 6 + math.ceil(n * bits / 8) + mask)
    assert fq.info["mask_encoding"] == ("csr" if frac == 0.05 else "bitmap")


def test_billm_bytes_formula():
    w, _, h = _problem()
    n, k = w.shape
    fq = billm(w, None, h)
    cols = fq.info["salient_columns"]
    assert len(cols) == 2 and all(1 <= len(c) <= 49 for c in cols)
    assert all(0 <= j < 128 for j in cols[0]) and all(128 <= j < 256 for j in cols[1])
    c = sum(len(x) for x in cols)
    assert fq.nbytes == (n * k // 8 + math.ceil(n * c / 8) + math.ceil(n * (k - c) / 8)
                         + 2 * n * 4 * 2 + 2 + c)


def test_bits_in_documented_ranges():
    w, _, h = _problem()
    bits = {name: f(w, None, h if name in NEEDS_HESSIAN else None).bits_per_weight()
            for name, f in BASELINES.items()}
    assert 2.25 < bits["rtn2"] < 2.3
    assert 1.0 < bits["w1"] < 1.13
    assert 2.5 < bits["billm"] < 2.52  # 2 + 64·2/256 + salient column list
    assert 2.9 < bits["pbllm10"] < 3.0  # published setting: 2.7 + 56/K
    w576, _, h576 = _problem(64, 576)
    assert 2.0 < BASELINES["pbllm"](w576, None, h576).bits_per_weight() <= 2.1
    assert 2.5 < billm(w576, None, h576).bits_per_weight() < 2.57


@pytest.mark.parametrize("method", [pbllm, billm])
def test_gptq_compensation_reduces_output_error(method):
    w, x, h = _problem()
    with_comp = method(w, None, h)
    without = method(w, None, h, compensate=False)
    assert _out_err(x, w, with_comp) < 0.8 * _out_err(x, w, without)
    # and both beat RTN w2 g64 (fewer or comparable bits) on this output error
    assert _out_err(x, w, with_comp) < 0.6 * _out_err(x, w, rtn(w))


def test_billm_residual_binarization_beats_single_on_salient_columns():
    w, _, _ = _problem()
    fq = billm(w, None, None)  # no Hessian: no compensation, so Ŵ is the block quantizer itself
    cols = [j for block in fq.info["salient_columns"] for j in block]
    assert {3, 70, 200} <= set(cols)  # the outlier columns are found salient
    for block in fq.info["salient_columns"]:
        ws = w[:, block]
        single = ws.abs().mean(1, keepdim=True) * torch.where(ws >= 0, 1.0, -1.0)
        err_res = (fq.weight[:, block] - ws).square().sum()
        assert err_res < 0.6 * (single - ws).square().sum()


def test_dead_columns_and_no_hessian_are_finite():
    w, x, h = _problem()
    h[7, :] = 0
    h[:, 7] = 0
    for name in NEEDS_HESSIAN:
        for hh in (h, None):
            fq = BASELINES[name](w, None, hh)
            assert torch.isfinite(fq.weight).all()


def test_dequantize_and_substituted_weights():
    w, _, h = _problem()
    lin = torch.nn.Sequential(torch.nn.Linear(256, 64))
    with torch.no_grad():
        lin[0].weight.copy_(w)
    fq = billm(w, lin[0].bias, h)
    assert isinstance(fq, FakeQuantized)
    assert fq.dequantize().shape == (64, 256) and fq.dequantize().dtype == torch.float32
    assert (fq.out_features, fq.in_features) == (64, 256)
    with substituted_weights(lin, {"0": fq}):
        assert torch.equal(lin[0].weight, fq.weight)
    assert torch.equal(lin[0].weight, w)


def test_linear_input_hessians_match_definition():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(16, 8), torch.nn.Linear(8, 6),
                                torch.nn.ReLU(), torch.nn.Linear(6, 4))
    ids = torch.randint(0, 16, (3, 5))
    hs = linear_input_hessians(model, ids)
    x = model[0](ids).reshape(-1, 8)
    torch.testing.assert_close(hs["1"], 2 * x.T @ x / 15, rtol=1e-5, atol=1e-6)
    x2 = model[2](model[1](model[0](ids))).reshape(-1, 6)
    torch.testing.assert_close(hs["3"], 2 * x2.T @ x2 / 15, rtol=1e-5, atol=1e-6)


def test_hessian_shared_input_counted_once_per_linear():
    class Two(torch.nn.Module):  # two Linears fed the same tensor, like q/k/v
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 2)

        def forward(self, x):
            return self.a(x).sum() + self.b(x).sum()

    x = torch.randn(2, 7, 4)
    hs = linear_input_hessians(Two(), x)
    ref = 2 * x[0].T @ x[0] + 2 * x[1].T @ x[1]
    for k in ("a", "b"):
        torch.testing.assert_close(hs[k], ref / 14, rtol=1e-5, atol=1e-6)


def test_refine_codes_gptq_lowers_output_error_on_the_same_grid():
    """A w4 op (every channel salient) with GPTQ codes: same scales and zero points (same
    format and size), lower output error ||X (W - Q)^T|| than round to nearest on
    correlated inputs; an op with binary channels is refused."""
    from qexport.gptq import refine_codes

    g = torch.Generator().manual_seed(0)
    n, k = 48, 128
    w = torch.randn(n, k, generator=g)
    x = torch.randn(1024, 16, generator=g) @ torch.randn(16, k, generator=g) \
        + 0.1 * torch.randn(1024, k, generator=g)
    h = 2 * x.T @ x / x.shape[0]
    rtn = quantize_mixed(w, None, torch.arange(k), 32)
    refined = refine_codes(rtn, w, h)
    assert torch.equal(refined.salient_scale, rtn.salient_scale)
    assert torch.equal(refined.salient_zero, rtn.salient_zero)
    assert refined.weight_nbytes() == rtn.weight_nbytes()
    err = {name: float((x @ (w - p.dequantize()).T).norm()) for name, p in
           (("rtn", rtn), ("gptq", refined))}
    assert err["gptq"] < 0.7 * err["rtn"], err
    with pytest.raises(ValueError, match="every input channel is salient"):
        refine_codes(quantize_mixed(w, None, torch.arange(0, k, 2), 32), w, h)
