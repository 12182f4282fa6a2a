"""Replace aten.linear nodes by qexport custom ops holding packed weights."""
from __future__ import annotations

from typing import Callable

import torch
import torch.fx

import qexport.ops  # noqa: F401  (registers torch.ops.qexport.*)
from qexport.packing import MixedLinearWeights

from . import graph as G
from .manager import PassResult

# quantizer(layer_name, weight [N, K], bias [N] | None) -> packed weights, or None to keep fp
Quantizer = Callable[[str, torch.Tensor, torch.Tensor | None], MixedLinearWeights | None]


def replace_linear(gm: torch.fx.GraphModule, quantizer: Quantizer,
                   packed_out: dict[str, MixedLinearWeights] | None = None) -> PassResult:
    """Swap every constant-weight Linear that `quantizer` packs for
    torch.ops.qexport.binary_mixed_linear; packed weights become buffers of `gm`.
    `packed_out`, if given, receives layer_name -> packed weights."""
    notes, modified = [], False
    for lin in G.linear_nodes(gm):
        name = G.layer_name(lin)
        weight = G.get_tensor(gm, lin.args[1])
        bias = G.get_tensor(gm, lin.args[2]) if len(lin.args) > 2 and lin.args[2] is not None \
            else None
        packed = quantizer(name, weight, bias)
        if packed is None:
            notes.append(f"kept {name} in floating point")
            continue
        inputs = [None if t is None else G.new_attr(gm, f"qexport_{name}_{i}", t, lin)
                  for i, t in enumerate(packed.tensors())]
        attrs = packed.attributes()
        with gm.graph.inserting_before(lin):
            q = gm.graph.call_function(
                torch.ops.qexport.binary_mixed_linear.default,
                (lin.args[0], *inputs, attrs["in_features"], attrs["out_features"],
                 attrs["salient_group_size"], attrs["layout"]))
        q.meta.update({k: v for k, v in lin.meta.items() if k != "qexport_layer"})
        q.meta["qexport_layer"] = name
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
