"""Replace aten.linear nodes by qexport Linear ops holding packed weights."""
from __future__ import annotations

from typing import Callable

import torch
import torch.fx

from qexport import graph as G
from qexport import ops

from .manager import PassResult

# quantizer(layer_name, weight [N, K], bias [N] | None) -> packed weights of a registered
# Linear op (qexport.ops), or None to keep the Linear in floating point. A quantizer may also
# have `prepare(gm)`, called once before the first Linear (e.g. to learn from the model as
# the graph stands after the passes before this one).
Quantizer = Callable[[str, torch.Tensor, torch.Tensor | None], object]


def replace_linear(gm: torch.fx.GraphModule, quantizer: Quantizer,
                   packed_out: dict | None = None) -> PassResult:
    """Swap every constant-weight Linear that `quantizer` packs for the torch op of the packed
    weights' op (qexport.ops registry); packed weights become buffers of `gm`.
    `packed_out`, if given, receives layer_name -> packed weights."""
    notes, modified = [], False
    prepare = getattr(quantizer, "prepare", None)
    if prepare is not None:
        prepare(gm)
    for lin in G.linear_nodes(gm):
        name = G.layer_name(lin)
        weight = G.get_tensor(gm, lin.args[1])
        bias = G.get_tensor(gm, lin.args[2]) if len(lin.args) > 2 and lin.args[2] is not None \
            else None
        packed = quantizer(name, weight, bias)
        if packed is None:
            notes.append(f"kept {name} in floating point")
            continue
        spec = ops.spec_of_weights(packed)
        inputs = [None if t is None else G.new_attr(gm, f"qexport_{name}_{i}", t, lin)
                  for i, t in enumerate(packed.tensors())]
        with gm.graph.inserting_before(lin):
            q = gm.graph.call_function(
                spec.torch_op, ops.node_args(spec, lin.args[0], inputs, packed.attributes()))
        q.meta.update({k: v for k, v in lin.meta.items() if k != "qexport_layer"})
        G.set_layers(q, [(name, packed.out_features)])
        lin.replace_all_uses_with(q)
        gm.graph.erase_node(lin)
        if packed_out is not None:
            packed_out[name] = packed
        modified = True
    _drop_unused_attrs(gm)
    return PassResult(gm, modified, notes)


def _drop_unused_attrs(gm: torch.fx.GraphModule) -> None:
    """Delete get_attr nodes left without users (the fp weights) so they aren't exported."""
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)
