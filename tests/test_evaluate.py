"""qexport.evaluate: windowed perplexity against an independent computation."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from qexport.errors import QexportError
from qexport.evaluate import ort_logits_fn, perplexity, torch_logits_fn

V = 50


class Bigram(torch.nn.Module):
    """logits[b, t] = table[ids[b, t]]: a toy LM whose perplexity is easy to compute apart."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = torch.nn.Parameter(torch.randn(V, V, generator=g) * 3)

    def forward(self, ids):
        return self.table[ids]


def _reference_ppl(model, tokens, window):
    nll, n = 0.0, 0
    for s in range(0, len(tokens) - window + 1, window):
        w = tokens[s:s + window]
        with torch.no_grad():
            logits = model(w[None])[0].double()
        nll += F.cross_entropy(logits[:-1], w[1:], reduction="sum").item()
        n += window - 1
    return math.exp(nll / n)


def _tokens(n, seed=1):
    return torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("n,window,batch", [(1024, 128, 1), (1000, 128, 3), (300, 64, 8),
                                            (97, 512, 1)])
def test_matches_cross_entropy(n, window, batch):
    model = Bigram()
    toks = _tokens(n)
    got = perplexity(torch_logits_fn(model), toks, window=window, batch=batch)
    assert got == pytest.approx(_reference_ppl(model, toks, min(window, n)), rel=1e-10)


def test_uniform_logits_give_vocab_size():
    fn = lambda ids: torch.zeros(*ids.shape, V)  # noqa: E731
    assert perplexity(fn, _tokens(700), window=100, batch=2) == pytest.approx(V, rel=1e-12)


def test_perfect_model_gives_one():
    toks = torch.arange(200) % V

    def fn(ids):  # predicts the next id (id + 1) with near certainty
        return F.one_hot((ids + 1) % V, V).float() * 100.0
    assert perplexity(fn, toks, window=50) == pytest.approx(1.0, abs=1e-9)


def test_progress_and_numpy_logits():
    calls = []
    model = Bigram()
    fn = lambda ids: model(ids).detach().numpy()  # noqa: E731
    p = perplexity(fn, _tokens(1000), window=100, batch=4,
                   progress=lambda done, total: calls.append((done, total)))
    assert calls == [(4, 10), (8, 10), (10, 10)]
    assert p == pytest.approx(_reference_ppl(model, _tokens(1000), 100), rel=1e-10)


def test_errors():
    with pytest.raises(QexportError, match="at least 2 tokens"):
        perplexity(lambda ids: None, torch.tensor([1]))
    with pytest.raises(QexportError, match="shape"):
        perplexity(lambda ids: torch.zeros(ids.shape[0], V), _tokens(64), window=32)
    with pytest.raises(QexportError, match="outside the model's vocabulary"):
        perplexity(lambda ids: torch.zeros(*ids.shape, 10), _tokens(64), window=32)


def test_ort_logits_fn_matches_torch():
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    model = Bigram(seed=3)
    table = model.table.detach().numpy()
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "input_ids"], ["logits"], axis=0)], "bigram",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["B", "T"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", "T", V])],
        [numpy_helper.from_array(table, "table")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 10
    onnx.checker.check_model(proto)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    toks = _tokens(512)
    p_ort = perplexity(ort_logits_fn(sess), toks, window=64, batch=3)
    p_torch = perplexity(torch_logits_fn(model), toks, window=64, batch=3)
    assert p_ort == pytest.approx(p_torch, rel=1e-6)
    out = ort_logits_fn(sess)(toks[:16].view(2, 8))
    assert isinstance(out, np.ndarray) and out.shape == (2, 8, V)
