"""Fuse a residual add and the RMSNorm of its sum into one op (ONNX Runtime's
SkipSimplifiedLayerNormalization, `qexport.ops.skip_rms_norm`).

A pre-norm decoder block adds its attention's and its MLP's outputs to the residual stream and
normalizes each sum for the next projection; ONNX Runtime runs that as an Add beside a
SimplifiedLayerNormalization, two nodes per residual (60 per SmolLM2 token). The pass matches
the traced RMSNorm idiom of Hugging Face's Llama-like norms, in float32 (no-op casts to
float32 looked through):

    s = add(a, b); y = mul(weight, mul(s, rsqrt(add(mean(pow(s, 2), [-1], keepdim), eps))))

with a and b 2-D or 3-D of one shape and weight a float32 1-D constant (what ONNX Runtime's
op takes), and puts `skip_rms_norm(a, b, weight, eps)` in its place (its outputs: y and s,
which the next residual add reads). Norms of other forms (LayerNorm, Gemma's (1 + weight), a
float16 stream cast to float32) are left as they are. Run after the passes that read norms
(the OS+ fold changes the weight it finds here).
"""
from __future__ import annotations

import operator

import torch
import torch.fx

from qexport import graph as G
from qexport import ops

from .manager import PassResult

aten = torch.ops.aten


def fuse_skip_norm(gm: torch.fx.GraphModule) -> PassResult:
    """Replace each residual add + RMSNorm of the sum with one skip_rms_norm."""
    op = ops.get("SkipSimplifiedLayerNormalization").torch_op
    fused = 0
    for node in list(gm.graph.nodes):
        match = _match(gm, node)
        if match is None:
            continue
        add, a, b, weight, eps = match
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        if order[weight] > order[add]:
            add.prepend(weight)  # a constant: defined before the sum, where the op goes
        # right after the sum, so that whatever read the sum (the next residual add, casts,
        # dtype assertions) now reads the op's output, defined where the sum was
        with gm.graph.inserting_after(add):
            new = gm.graph.call_function(op, (a, b, weight, eps))
        with gm.graph.inserting_after(new):
            y = gm.graph.call_function(operator.getitem, (new, 0))
        with gm.graph.inserting_after(y):
            s = gm.graph.call_function(operator.getitem, (new, 1))
        y.meta["val"], s.meta["val"] = node.meta.get("val"), add.meta.get("val")
        new.meta["val"] = (y.meta["val"], s.meta["val"])
        node.replace_all_uses_with(y)
        gm.graph.erase_node(node)
        add.replace_all_uses_with(s)  # the next residual add; the norm's chain, now dead
        fused += 1
    if fused:
        gm.graph.eliminate_dead_code()
    notes = [f"fused {fused} residual adds into their RMSNorms"] if fused else []
    return PassResult(gm, fused > 0, notes)


def _call(node, target) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target == target


def _float32(node) -> bool:
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return val is not None and val.dtype == torch.float32


def _match(gm: torch.fx.GraphModule, node: torch.fx.Node):
    """(add, a, b, weight node, eps) if `node` is the weight multiply of an RMSNorm of a
    residual sum add(a, b), else None."""
    affine = G.norm_affine(gm, node)
    if affine is None or affine[0] != "rms_norm":
        return None
    weight = affine[1]
    normed = _source(node.args[1] if node.args[0] is weight else node.args[0])
    if not _call(normed, aten.mul.Tensor):
        return None
    s, rsqrt = (_source(t) for t in normed.args)
    if not _call(rsqrt, aten.rsqrt.default):
        s, rsqrt = rsqrt, s
    if not (_call(rsqrt, aten.rsqrt.default) and _call(s, aten.add.Tensor)):
        return None
    var = rsqrt.args[0]
    if not (_call(var, aten.add.Tensor) and isinstance(var.args[1], float)):
        return None
    mean = var.args[0]
    if not (_call(mean, aten.mean.dim) and isinstance(mean.args[1], (list, tuple))
            and list(mean.args[1]) in ([-1], [s.meta["val"].dim() - 1])
            and len(mean.args) > 2 and mean.args[2] is True):
        return None
    square = mean.args[0]
    if not (_call(square, aten.pow.Tensor_Scalar) and _source(square.args[0]) is s
            and square.args[1] == 2):
        return None
    a, b = s.args[:2]
    if len(s.args) > 2 or s.kwargs or not all(isinstance(t, torch.fx.Node) and _float32(t)
                                              for t in (a, b, s)):
        return None
    # ONNX Runtime's op: [B, S, H] or [S, H] addends of one shape, a float32 weight [H]
    if a.meta["val"].shape != b.meta["val"].shape or a.meta["val"].dim() not in (2, 3) \
            or G.is_param(a) or G.is_param(b):
        return None
    w = G.get_tensor(gm, weight)
    if w.dtype != torch.float32 or w.shape[0] != a.meta["val"].shape[-1]:
        return None
    return s, a, b, weight, float(var.args[1])


def _source(node):
    """The node computing `node`'s value through no-op casts, None if any node on the way is
    not float32 (a norm computed in float32 from a float16 stream, or a round trip through
    float16, is not the fused op's math)."""
    while isinstance(node, torch.fx.Node) and _float32(node):
        src = G.producer_through_passthrough(node)
        if src is node:
            return node
        node = node.args[0]  # one cast back
    return None

