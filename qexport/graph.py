"""Small adapter over the aten-level fx graph, so passes (and the checks that read a rewritten
graph) don't depend on its details: constants, Linears, norms, and the layer names qexport
keeps in node.meta."""
from __future__ import annotations

import re

import torch
import torch.fx

LINEAR = torch.ops.aten.linear.default
_MUL = torch.ops.aten.mul.Tensor
_LAYER_NORM = torch.ops.aten.layer_norm.default
# Ops that only change dtype/metadata between a norm and its consumers.
_PASSTHROUGH = {torch.ops.aten._to_copy.default, torch.ops.aten.to.dtype,
                torch.ops.aten.to.dtype_layout, torch.ops.aten.clone.default}


def get_tensor(gm: torch.fx.GraphModule, node: torch.fx.Node) -> torch.Tensor:
    obj = gm
    for part in node.target.split("."):
        obj = getattr(obj, part)
    return obj


def set_tensor(gm: torch.fx.GraphModule, node: torch.fx.Node, value: torch.Tensor,
               name: str) -> None:
    """Point get_attr `node` at a new buffer (the original tensor may be the user's)."""
    attr = re.sub(r"[^0-9a-zA-Z_]", "_", name)
    while hasattr(gm, attr):
        attr += "_"
    gm.register_buffer(attr, value.detach().contiguous())
    node.target = attr


def new_attr(gm: torch.fx.GraphModule, name: str, value: torch.Tensor,
             before: torch.fx.Node) -> torch.fx.Node:
    attr = re.sub(r"[^0-9a-zA-Z_]", "_", name)
    while hasattr(gm, attr):
        attr += "_"
    gm.register_buffer(attr, value.detach().contiguous())
    with gm.graph.inserting_before(before):
        return gm.graph.get_attr(attr)


def is_param(node) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "get_attr"


def linear_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """aten.linear nodes whose weight (and bias, if any) are constants of the module."""
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target == LINEAR and is_param(n.args[1]):
            if len(n.args) < 3 or n.args[2] is None or is_param(n.args[2]):
                out.append(n)
    return out


def layer_name(node: torch.fx.Node) -> str:
    """Stable name of a Linear: its module path in the traced module, e.g.
    'model.model.layers.0.self_attn.q_proj' (kept in node.meta)."""
    if "qexport_layer" not in node.meta:
        target = node.args[1].target
        name = target[:-len(".weight")] if target.endswith(".weight") else target
        node.meta["qexport_layer"] = name
    return node.meta["qexport_layer"]


def consumers_through_passthrough(node: torch.fx.Node) -> list[torch.fx.Node]:
    """Users of `node`, looking through dtype casts."""
    out = []
    for u in node.users:
        if u.op == "call_function" and u.target in _PASSTHROUGH:
            out.extend(consumers_through_passthrough(u))
        else:
            out.append(u)
    return out


def norm_affine(gm: torch.fx.GraphModule, node: torch.fx.Node):
    """If `node` is the affine end of a norm, return (kind, gamma_node, beta_node|None).

    Recognises aten.layer_norm(x, shape, weight, bias, eps) and the RMSNorm idiom
    mul(weight, normalized) / mul(normalized, weight) with a 1-D constant weight.
    """
    if node.op != "call_function":
        return None
    if node.target == _LAYER_NORM:
        args = list(node.args) + [None] * (5 - len(node.args))
        gamma, beta = args[2], args[3]
        if is_param(gamma) and (beta is None or is_param(beta)):
            return "layer_norm", gamma, beta
        return None
    if node.target == _MUL and len(node.args) == 2:
        for i in (0, 1):
            gamma = node.args[i]
            if is_param(gamma) and get_tensor(gm, gamma).dim() == 1:
                return "rms_norm", gamma, None
    return None


def producer_through_passthrough(node: torch.fx.Node) -> torch.fx.Node:
    """The node computing `node`'s value, looking back through dtype casts."""
    while (node.op == "call_function" and node.target in _PASSTHROUGH and node.args
           and isinstance(node.args[0], torch.fx.Node)):
        node = node.args[0]
    return node


def norm_fed(gm: torch.fx.GraphModule, linear: torch.fx.Node) -> bool:
    """Whether a Linear's input comes straight from a norm (where OS+ can fold)."""
    x = linear.args[0]
    return isinstance(x, torch.fx.Node) and \
        norm_affine(gm, producer_through_passthrough(x)) is not None


def layers_of(node: torch.fx.Node) -> list[tuple[str, int]]:
    """(layer name, output rows) of every layer a qexport Linear op node computes, in row
    order: one, or several for a node stacking layers (passes.fuse_shared_input). Set by
    `set_layers` when the op node is made."""
    return list(node.meta["qexport_layers"])


def set_layers(node: torch.fx.Node, layers: list[tuple[str, int]]) -> None:
    """Record on a qexport op node the layers it computes: its name is the layers' names
    (fused_name), and `layers_of` gives them with their rows."""
    node.meta["qexport_layer"] = fused_name([name for name, _ in layers])
    node.meta["qexport_layers"] = [(name, int(rows)) for name, rows in layers]


def fused_name(names: list[str]) -> str:
    """'a.b.q_proj', 'a.b.k_proj' -> 'a.b.q_proj+k_proj': the shared module path once."""
    prefix = names[0].rsplit(".", 1)[0] + "."
    if all(n.startswith(prefix) for n in names):
        return names[0] + "".join("+" + n[len(prefix):] for n in names[1:])
    return "+".join(names)
