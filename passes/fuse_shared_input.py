"""Merge qexport linears that read the same input with the same salient channels into one op.

q/k/v and gate/up read one normed activation, and PTQ1.61 picks salient channels from that
activation, so their masks are equal: their rows can stack into one BinaryMixedLinear followed
by a split. The result is exact (rows are independent in the op). At decoding, one call
builds the activation tables once instead of per projection and hands the thread pool one
job big enough to split (docs/kernels.md); fewer, larger calls also suit the CUDA and
TensorRT paths.
"""
from __future__ import annotations

import operator

import torch
import torch.fx

from qexport import contract as C
from qexport.packing import MixedLinearWeights

from . import graph as G
from .manager import PassResult

OP = torch.ops.qexport.binary_mixed_linear.default
_N_WEIGHTS = 9  # op args: x, 9 weight inputs, in_features, out_features, group size, layout


def layers_of(node: torch.fx.Node) -> list[tuple[str, int]]:
    """(layer name, output rows) of every layer a qexport op node computes, in row order."""
    if "qexport_layers" in node.meta:
        return list(node.meta["qexport_layers"])
    return [(node.meta["qexport_layer"], int(node.args[1 + _N_WEIGHTS + 1]))]


def fused_name(names: list[str]) -> str:
    """'a.b.q_proj', 'a.b.k_proj' -> 'a.b.q_proj+k_proj': the shared module path once."""
    prefix = names[0].rsplit(".", 1)[0] + "."
    if all(n.startswith(prefix) for n in names):
        return names[0] + "".join("+" + n[len(prefix):] for n in names[1:])
    return "+".join(names)


def _weights(gm, node) -> MixedLinearWeights:
    args = node.args
    tensors = [None if a is None else G.get_tensor(gm, a) for a in args[1:1 + _N_WEIGHTS]]
    k, n, g, layout = args[1 + _N_WEIGHTS:]
    return MixedLinearWeights(k, n, g, *tensors, layout=layout)


def fuse_shared_input(gm: torch.fx.GraphModule) -> PassResult:
    """Stack the qexport ops that share an input node and whose weights stack
    (MixedLinearWeights.stacks_with) into one op plus a split along the last axis."""
    by_input: dict[torch.fx.Node, list[torch.fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target == OP:
            by_input.setdefault(node.args[0], []).append(node)
    notes, modified = [], False
    for nodes in by_input.values():
        weights = {n: _weights(gm, n) for n in nodes}
        while nodes:
            first, rest = nodes[0], nodes[1:]
            group = [first] + [n for n in rest if weights[first].stacks_with(weights[n])]
            nodes = [n for n in rest if n not in group]
            if len(group) > 1:
                notes.append(_fuse(gm, group, [weights[n] for n in group]))
                modified = True
    if modified:
        for node in list(gm.graph.nodes):  # the parts' packed tensors
            if node.op == "get_attr" and not node.users:
                gm.graph.erase_node(node)
    return PassResult(gm, modified, notes)


def _fuse(gm, group: list[torch.fx.Node], parts: list[MixedLinearWeights]) -> str:
    layers = [entry for n in group for entry in layers_of(n)]
    name = fused_name([layer for layer, _ in layers])
    stacked = MixedLinearWeights.stack(parts)
    # Inserted before the first part: the parts read one input, defined before all of them.
    first = group[0]
    inputs = []
    for i, t in enumerate(stacked.tensors(), start=1):  # i: the op's input index
        if t is None:
            inputs.append(None)
        elif i in (C.IN_SALIENT_IDX, C.IN_R2):  # equal across the parts: the first's
            inputs.append(first.args[i])
        else:
            inputs.append(G.new_attr(gm, f"qexport_{name}_{i - 1}", t, first))
    attrs = stacked.attributes()
    with gm.graph.inserting_before(first):
        fused = gm.graph.call_function(OP, (first.args[0], *inputs, attrs[C.ATTR_IN_FEATURES],
                                            attrs[C.ATTR_OUT_FEATURES],
                                            attrs[C.ATTR_SALIENT_GROUP_SIZE], attrs[C.ATTR_LAYOUT]))
        sizes = [p.out_features for p in parts]
        split = gm.graph.call_function(torch.ops.aten.split_with_sizes.default,
                                       (fused, sizes, -1))
        outs = [gm.graph.call_function(operator.getitem, (split, i)) for i in range(len(parts))]
    fused.meta.update({k: v for k, v in first.meta.items()
                       if k not in ("qexport_layer", "qexport_layers", "val", "tensor_meta")})
    fused.meta["qexport_layer"] = name
    fused.meta["qexport_layers"] = layers
    for part, out in zip(group, outs):
        part.replace_all_uses_with(out)
        gm.graph.erase_node(part)
    return f"stacked {name} ({sum(sizes)} rows)"
