"""Merge qexport Linear ops that read the same input and whose weights stack into one op.

q/k/v and gate/up read one normed activation, and PTQ1.61 picks salient channels from that
activation, so their masks are equal: their rows can stack into one BinaryMixedLinear followed
by a split. The result is exact (rows are independent in the op). At decoding, one call
builds the activation tables once instead of per projection and hands the thread pool one
job big enough to split (docs/kernels.md); fewer, larger calls also suit the CUDA and
TensorRT paths. Whether two ops stack is their packed-weight class's rule (`stacks_with`,
`stack`): this pass knows no op.
"""
from __future__ import annotations

import operator

import torch
import torch.fx

from qexport import graph as G
from qexport import ops

from .manager import PassResult


def fuse_shared_input(gm: torch.fx.GraphModule) -> PassResult:
    """Stack the qexport Linear ops of one kind that share an input node and whose weights
    stack (`stacks_with`) into one op plus a split along the last axis."""
    by_input: dict[tuple, list[torch.fx.Node]] = {}
    for node in gm.graph.nodes:
        spec = ops.spec_of_node(node)
        if spec is not None:
            by_input.setdefault((node.args[0], spec.name), []).append(node)
    notes, modified = [], False
    for nodes in by_input.values():
        spec = ops.spec_of_node(nodes[0])
        weights = {n: ops.weights_of_node(spec, n, lambda a: G.get_tensor(gm, a)) for n in nodes}
        while nodes:
            first, rest = nodes[0], nodes[1:]
            group = [first] + [n for n in rest if weights[first].stacks_with(weights[n])]
            nodes = [n for n in rest if n not in group]
            if len(group) > 1:
                notes.append(_fuse(gm, spec, group, [weights[n] for n in group]))
                modified = True
    if modified:
        for node in list(gm.graph.nodes):  # the parts' packed tensors
            if node.op == "get_attr" and not node.users:
                gm.graph.erase_node(node)
    return PassResult(gm, modified, notes)


def _fuse(gm, spec: ops.OpSpec, group: list[torch.fx.Node], parts: list) -> str:
    layers = [entry for n in group for entry in G.layers_of(n)]
    name = G.fused_name([layer for layer, _ in layers])
    stacked = type(parts[0]).stack(parts)
    # Inserted before the first part: the parts read one input, defined before all of them.
    first = group[0]
    inputs = []
    for i, (t, own) in enumerate(zip(stacked.tensors(), parts[0].tensors()), start=1):
        if t is None:
            inputs.append(None)
        elif t is own:  # shared by the parts (stack keeps the first's): its node as it is
            inputs.append(first.args[i])
        else:
            inputs.append(G.new_attr(gm, f"qexport_{name}_{i - 1}", t, first))
    with gm.graph.inserting_before(first):
        fused = gm.graph.call_function(
            spec.torch_op, ops.node_args(spec, first.args[0], inputs, stacked.attributes()))
        sizes = [p.out_features for p in parts]
        split = gm.graph.call_function(torch.ops.aten.split_with_sizes.default,
                                       (fused, sizes, -1))
        outs = [gm.graph.call_function(operator.getitem, (split, i)) for i in range(len(parts))]
    fused.meta.update({k: v for k, v in first.meta.items()
                       if k not in ("qexport_layer", "qexport_layers", "val", "tensor_meta")})
    G.set_layers(fused, layers)
    for part, out in zip(group, outs):
        part.replace_all_uses_with(out)
        gm.graph.erase_node(part)
    return f"stacked {name} ({sum(sizes)} rows)"
