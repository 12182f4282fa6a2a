"""OS+ (Outlier Suppression+): per-channel shift z and scale s folded into norm and Linears.

For the activation X feeding a group of Linears right after a norm, with (z, s) from the
`choose` function handed in (qexport/outlier.py: the OS+ search or a fixed quantile):
fold β ← (β - z)/s, γ ← γ/s; every following Linear: W ← W·diag(s), b ← b + W z.
The transformed model computes the same function in exact arithmetic.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.fx

from qexport import graph as G

from .manager import PassResult


# choose(stats, use_shift, weights) -> (z, s); see qexport/outlier.py
Choose = Callable[[object, bool, dict], tuple[torch.Tensor, torch.Tensor]]


def fold_outlier_shift_scale(gm: torch.fx.GraphModule, stats: dict, choose: Choose,
                             folded: dict[str, str] | None = None) -> PassResult:
    """Fold OS+ into every norm whose consumers are all Linears with statistics.

    `stats` maps layer_name -> statistics of that Linear's input (qexport.outlier.OutlierStats);
    the entries of folded Linears are replaced by the statistics of the transformed input.
    `choose(stats, use_shift, weights) -> (z, s)` picks the transform (weights: layer name ->
    weight of the consuming Linears). `folded`, if given, maps the original name of every tensor changed
    (e.g. 'model.layers.0.input_layernorm.weight'; a bias that didn't exist: '<layer>.bias')
    to the attribute of `gm` now holding it, so an eager copy of the model can follow.
    """
    folded = {} if folded is None else folded
    notes, modified, shared = [], False, []
    for node in list(gm.graph.nodes):
        affine = G.norm_affine(gm, node)
        if affine is None:
            continue
        kind, gamma_node, beta_node = affine
        users = G.consumers_through_passthrough(node)
        linears = [u for u in users if u.op == "call_function" and u.target == G.LINEAR
                   and G.is_param(u.args[1]) and len(u.args[1].users) == 1]
        if not linears or len(linears) != len(users):
            shared.append(node.name)  # e.g. a post-LN norm, whose output is also a residual
            continue
        names = [G.layer_name(u) for u in linears]
        if any(n not in stats for n in names):
            notes.append(f"skipped {node.name}: no calibration statistics for {names}")
            continue
        gamma = G.get_tensor(gm, gamma_node).detach().float()
        use_shift = beta_node is not None
        weights = {name: G.get_tensor(gm, lin.args[1]).detach()
                   for lin, name in zip(linears, names)}
        z, s = choose(stats[names[0]], use_shift, weights)
        if not use_shift:
            z = torch.zeros_like(z)
        if bool((s == 1).all()) and bool((z == 0).all()):
            continue
        _replace(gm, gamma_node, (gamma / s).to(gamma.dtype), f"qexport_os_{node.name}_gamma",
                 folded)
        if beta_node is not None:
            beta = G.get_tensor(gm, beta_node).detach().float()
            _replace(gm, beta_node, ((beta - z) / s).to(beta.dtype),
                     f"qexport_os_{node.name}_beta", folded)
        for lin, name in zip(linears, names):
            _fold_into_linear(gm, lin, z, s, name, folded)
            stats[name] = stats[name].transformed(z, s)
        modified = True
        notes.append(f"{node.name} ({kind}) -> {', '.join(names)}: "
                     f"{int((s > 1).sum())} channels scaled, max s {float(s.max()):.2f}")
    if shared:
        notes.append(f"{len(shared)} norm(s) not folded: their output also feeds other ops than "
                     f"Linears (a post-norm residual: scaling it would change the model), "
                     f"e.g. {shared[0]}")
    return PassResult(gm, modified, notes)


def _replace(gm, node: torch.fx.Node, value: torch.Tensor, new_name: str, folded: dict) -> None:
    original = node.target
    G.set_tensor(gm, node, value, new_name)
    folded[original] = node.target


def _fold_into_linear(gm, lin: torch.fx.Node, z: torch.Tensor, s: torch.Tensor,
                      name: str, folded: dict) -> None:
    w_node = lin.args[1]
    w = G.get_tensor(gm, w_node).detach()
    wf = w.float()
    _replace(gm, w_node, (wf * s[None, :]).to(w.dtype), f"qexport_os_{name}_weight", folded)
    if bool((z == 0).all()):
        return
    shift = wf @ z
    b_node = lin.args[2] if len(lin.args) > 2 else None
    if b_node is not None:
        b = G.get_tensor(gm, b_node).detach()
        _replace(gm, b_node, (b.float() + shift).to(b.dtype), f"qexport_os_{name}_bias", folded)
    else:
        new_b = G.new_attr(gm, f"qexport_os_{name}_bias", shift.to(w.dtype), lin)
        folded[f"{name}.bias"] = new_b.target
        lin.args = (lin.args[0], w_node, new_b)
