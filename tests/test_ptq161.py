"""PTQ1.61 learned block-wise scales (qexport.ptq161) on tiny random-init Llama and OPT."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qexport.errors import QexportError
from qexport.ops import apply
from qexport.ops.binary_mixed_linear.packing import MixedLinearWeights
from qexport.families import find_blocks
from qexport.ptq161 import (LearnConfig, LearnedLinear, learn_mixed_weights,
                            linear_input_rms, substituted_weights)
from qexport.quantizers import quantize_mixed, select_salient
from tests.tiny_models import LogitsOnly, tiny_llama, tiny_opt

MODELS = {"llama": tiny_llama, "opt": tiny_opt}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _setup(kind, group_size=0):
    module = LogitsOnly(MODELS[kind]())
    ids = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(1))
    path, blocks = find_blocks(module)
    rms = linear_input_rms(module, ids, include=lambda n: n.startswith(path + "."))
    salient = {k: select_salient(v, 0.2) for k, v in rms.items()}
    return module, ids, path, blocks, salient


@pytest.fixture(scope="module", params=sorted(MODELS))
def learned(request):
    module, ids, path, blocks, salient = _setup(request.param)
    messages = []
    packed = learn_mixed_weights(module, ids, salient, 0, LearnConfig(epochs=4),
                                 progress=messages.append)
    return request.param, module, ids, path, blocks, salient, packed, messages


def _block_outputs(module, blocks, ids):
    """Output of every block in a full forward."""
    outs = []
    hooks = [b.register_forward_hook(lambda m, a, o: outs.append(o[0] if isinstance(o, tuple)
                                                                 else o)) for b in blocks]
    try:
        with torch.no_grad():
            module(ids)
    finally:
        for h in hooks:
            h.remove()
    return outs


def test_covers_every_linear_in_blocks(learned):
    _, module, _, path, blocks, _, packed, messages = learned
    expect = {f"{path}.{i}.{n}" for i, b in enumerate(blocks)
              for n, m in b.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(packed) == expect
    for name, pk in packed.items():
        assert isinstance(pk, MixedLinearWeights)
        pk.validate()
        assert pk.r2 is not None and pk.r2.dtype == torch.float16
    assert any("ETA" in m for m in messages) and len(messages) == len(blocks) + 1


def test_learned_beats_closed_form_on_block_outputs(learned):
    _, module, ids, _, blocks, salient, packed, _ = learned
    mods = dict(module.named_modules())
    closed = {k: quantize_mixed(mods[k].weight, mods[k].bias, salient[k], 0) for k in packed}
    ref = _block_outputs(module, blocks, ids)
    with substituted_weights(module, packed):
        got_learned = _block_outputs(module, blocks, ids)
    with substituted_weights(module, closed):
        got_closed = _block_outputs(module, blocks, ids)
    for i, r in enumerate(ref):
        e_learned = F.mse_loss(got_learned[i], r).item()
        e_closed = F.mse_loss(got_closed[i], r).item()
        assert e_learned < e_closed, f"block {i}: learned {e_learned} >= closed form {e_closed}"
    # substituted_weights restores the fp weights
    assert all(torch.equal(a, b) for a, b in zip(_block_outputs(module, blocks, ids), ref))


def test_reference_op_runs_on_learned_weights(learned):
    _, module, _, _, _, _, packed, _ = learned
    mods = dict(module.named_modules())
    for name, pk in packed.items():
        x = torch.randn(3, 5, pk.in_features, generator=torch.Generator().manual_seed(0))
        y = apply(x, pk)
        bias = mods[name].bias
        want = F.linear(x, pk.dequantize(), None if bias is None else bias.float())
        torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("group_size,ratio", [(0, 0.2), (8, 0.2), (0, 0.0), (8, 1.0)])
def test_packed_weights_dequantize_to_what_was_learned(group_size, ratio):
    torch.manual_seed(0)
    w, b = torch.randn(12, 37), torch.randn(12)
    sal = select_salient(torch.rand(37), ratio)
    ll = LearnedLinear(w, b, sal, group_size)
    with torch.no_grad():  # move away from the closed form
        ll.a.mul_(1.1 + 0.1 * torch.rand(12))
        ll.r1.mul_(0.9 + 0.2 * torch.rand(12))
        ll.r2.mul_(0.8 + 0.4 * torch.rand(ll.kb))
    pk = ll.pack()
    torch.testing.assert_close(pk.dequantize(), ll.weight(rounded=True), rtol=0, atol=0)
    torch.testing.assert_close(pk.dequantize(), ll.weight().detach(), rtol=2e-3, atol=1e-3)
    torch.testing.assert_close(pk.bias, b)
    # salient columns are the closed form's 4-bit RTN, untouched by learning
    closed = quantize_mixed(w, b, sal, group_size)
    s = sal.long()
    assert torch.equal(pk.dequantize()[:, s], closed.dequantize()[:, s])
    assert torch.equal(pk.sign_packed, closed.sign_packed)


def test_initial_factors_are_the_closed_form():
    torch.manual_seed(0)
    w = torch.randn(10, 40)
    sal = select_salient(torch.rand(40), 0.25)
    ll = LearnedLinear(w, None, sal, 0)
    closed = quantize_mixed(w, None, sal, 0)
    torch.testing.assert_close(ll.weight().detach(), closed.dequantize(), rtol=1e-3, atol=1e-3)


def test_zero_epochs_is_the_closed_form():
    module, ids, _, _, salient = _setup("llama")
    packed = learn_mixed_weights(module, ids, salient, 0, LearnConfig(epochs=0))
    mods = dict(module.named_modules())
    for k, pk in packed.items():
        closed = quantize_mixed(mods[k].weight, mods[k].bias, salient[k], 0)
        assert torch.equal(pk.dequantize(), closed.dequantize()), k


def test_errors_are_clear():
    with pytest.raises(QexportError, match="transformer blocks"):
        find_blocks(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    module, ids, _, _, salient = _setup("opt")
    salient.pop(next(iter(salient)))
    with pytest.raises(QexportError, match="no salient channels"):
        learn_mixed_weights(module, ids, salient, 0, LearnConfig(epochs=1))
    with pytest.raises(QexportError, match="preset"):
        LearnConfig.preset("slow")
    assert LearnConfig.preset("fast").n_samples == 16


def test_spill_to_disk_gives_the_same_result(tmp_path):
    module, ids, _, _, salient = _setup("opt")
    cfg = LearnConfig(epochs=1, batch_size=3)
    a = learn_mixed_weights(module, ids, salient, 0, cfg)
    b = learn_mixed_weights(module, ids, salient, 0,
                            LearnConfig(epochs=1, batch_size=3, spill_dir=str(tmp_path)))
    for k in a:
        torch.testing.assert_close(a[k].dequantize(), b[k].dequantize(), rtol=0, atol=0)
    assert not any(tmp_path.iterdir())  # spill files removed
