"""PTQ1.61's quantization preprocessing (qexport/preprocess.py): restorative LoRA makes the
fp model's closed-form w1.61 closer to the original fp model, and leaves the original alone."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from qexport.families import find_blocks
from qexport.config import LoRAConfig
from qexport.preprocess import RestorativeLoRA, fake_quantize_w161
from qexport.quantizers import quantize_mixed, select_salient

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_fake_quantization_is_the_closed_form_format():
    """The STE's forward value is exactly what quantize_mixed stores (up to its fp16 scales)."""
    w = torch.randn(24, 50, generator=torch.Generator().manual_seed(0))
    sal = select_salient(torch.rand(50, generator=torch.Generator().manual_seed(1)), 0.2)
    q = fake_quantize_w161(w.clone().requires_grad_(), sal)
    ref = quantize_mixed(w, None, sal, 0).dequantize()
    assert torch.allclose(q.detach(), ref, atol=2e-3 * float(w.abs().max()))
    q.sum().backward()  # straight through: d(sum)/dw = 1


def _fq_kl(model, ref, ids, ratio=0.2):
    """KL of `model` with its block Linears fake-quantized (salient channels from `ref` on
    `ids`, as the preprocessing picks them), against `ref` (fp), on `ids`."""
    path, blocks = find_blocks(model)
    mods = dict(model.named_modules())
    names = [f"{path}.{bi}.{sub}" for bi, b in enumerate(blocks)
             for sub, m in b.named_modules() if isinstance(m, torch.nn.Linear)]
    from qexport.ptq161 import linear_input_rms
    rms = linear_input_rms(ref, ids, include=set(names).__contains__)
    params = {f"{n}.weight": fake_quantize_w161(mods[n].weight, select_salient(rms[n], ratio))
              for n in names}
    with torch.no_grad():
        t = F.log_softmax(ref(ids), -1)
        s = F.log_softmax(functional_call(model, params, (ids,)), -1)
    return float(F.kl_div(s.flatten(0, -2), t.flatten(0, -2), log_target=True,
                          reduction="batchmean"))


def test_lora_makes_the_model_binarize_better():
    from tiny_models import LogitsOnly, tiny_llama

    model = LogitsOnly(tiny_llama())
    before_params = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 128, (12, 32), generator=torch.Generator().manual_seed(0))
    pre = RestorativeLoRA(LoRAConfig(rank=8, alpha=8, epochs=4, lr=3e-3))
    merged = pre(model, [(ids[i:i + 1],) for i in range(8)])
    assert merged is not model
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before_params.items())
    # the objective it trained (a random-init toy has nothing to generalise: the held-out gain
    # is measured on SmolLM2, docs/results.md)
    calib = ids[:8]
    assert _fq_kl(merged, model, calib) < 0.8 * _fq_kl(model, model, calib)
    # only the block Linears moved, by a low-rank update
    diff = {k: merged.state_dict()[k] - v for k, v in before_params.items()}
    moved = [k for k, d in diff.items() if d.abs().max() > 0]
    assert moved and all(".layers." in k and k.endswith("proj.weight") for k in moved)
    assert all(torch.linalg.matrix_rank(diff[k]) <= 8 for k in moved)
    assert "preprocess_lora" in pre.timings
