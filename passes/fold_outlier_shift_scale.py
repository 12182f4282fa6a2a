"""OS+ (Outlier Suppression+): per-channel shift z and scale s folded into norm and Linears.

For the activation X feeding a group of Linears right after a norm:
    z_j = (max X_j + min X_j) / 2      (only where the norm has a bias β to absorb it)
    s_j = max(1, max|X_j - z_j| / t)
Fold: β ← (β - z)/s, γ ← γ/s; every following Linear: W ← W·diag(s), b ← b + W z.
The transformed model computes the same function in exact arithmetic.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.fx

from . import graph as G
from .manager import PassResult


@dataclasses.dataclass
class OutlierStats:
    """Per-channel statistics of one activation over calibration tokens."""
    count: int
    min: torch.Tensor
    max: torch.Tensor
    sum: torch.Tensor
    sumsq: torch.Tensor

    @classmethod
    def empty(cls, k: int) -> "OutlierStats":
        return cls(0, torch.full((k,), float("inf"), dtype=torch.float64),
                   torch.full((k,), float("-inf"), dtype=torch.float64),
                   torch.zeros(k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64))

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        self.count += x.shape[0]
        self.min = torch.minimum(self.min, x.amin(0).double())
        self.max = torch.maximum(self.max, x.amax(0).double())
        self.sum += x.sum(0, dtype=torch.float64)
        self.sumsq += x.square().sum(0, dtype=torch.float64)

    @property
    def rms(self) -> torch.Tensor:
        return (self.sumsq / max(self.count, 1)).sqrt()

    def transformed(self, z: torch.Tensor, s: torch.Tensor) -> "OutlierStats":
        """Exact statistics of (X - z) / s (s > 0)."""
        z, s = z.double(), s.double()
        n = self.count
        sumsq = (self.sumsq - 2 * z * self.sum + n * z * z) / (s * s)
        return OutlierStats(n, (self.min - z) / s, (self.max - z) / s, (self.sum - n * z) / s,
                            sumsq)


def choose_shift_scale(stats: OutlierStats, use_shift: bool, t: float | None = None,
                       quantile: float = 0.99) -> tuple[torch.Tensor, torch.Tensor]:
    """z and s for one activation. Without `t`, t is the `quantile` of the per-channel
    half-ranges, so only channels beyond it are scaled down to it."""
    z = (stats.max + stats.min) / 2 if use_shift else torch.zeros_like(stats.max)
    half_range = torch.maximum((stats.max - z).abs(), (stats.min - z).abs())
    if t is None:
        t = float(torch.quantile(half_range, quantile))
    s = torch.clamp(half_range / max(t, 1e-12), min=1.0)
    return z.float(), s.float()


def fold_outlier_shift_scale(gm: torch.fx.GraphModule, stats: dict[str, OutlierStats],
                             choose=choose_shift_scale) -> PassResult:
    """Fold OS+ into every norm whose consumers are all Linears with statistics.

    `stats` maps layer_name -> statistics of that Linear's input; the entries of folded
    Linears are replaced by the statistics of the transformed input.
    `choose(stats, use_shift) -> (z, s)` picks the transform.
    """
    notes, modified = [], False
    for node in list(gm.graph.nodes):
        affine = G.norm_affine(gm, node)
        if affine is None:
            continue
        kind, gamma_node, beta_node = affine
        users = G.consumers_through_passthrough(node)
        linears = [u for u in users if u.op == "call_function" and u.target == G.LINEAR
                   and G.is_param(u.args[1]) and len(u.args[1].users) == 1]
        if not linears or len(linears) != len(users):
            continue
        names = [G.layer_name(u) for u in linears]
        if any(n not in stats for n in names):
            notes.append(f"skipped {node.name}: no calibration statistics for {names}")
            continue
        gamma = G.get_tensor(gm, gamma_node).detach().float()
        use_shift = beta_node is not None
        z, s = choose(stats[names[0]], use_shift)
        if not use_shift:
            z = torch.zeros_like(z)
        if bool((s == 1).all()) and bool((z == 0).all()):
            continue
        G.set_tensor(gm, gamma_node, (gamma / s).to(gamma.dtype), f"qexport_os_{node.name}_gamma")
        if beta_node is not None:
            beta = G.get_tensor(gm, beta_node).detach().float()
            G.set_tensor(gm, beta_node, ((beta - z) / s).to(beta.dtype),
                         f"qexport_os_{node.name}_beta")
        for lin, name in zip(linears, names):
            _fold_into_linear(gm, lin, z, s, name)
            stats[name] = stats[name].transformed(z, s)
        modified = True
        notes.append(f"{node.name} ({kind}) -> {', '.join(names)}: "
                     f"{int((s > 1).sum())} channels scaled, max s {float(s.max()):.2f}")
    return PassResult(gm, modified, notes)


def _fold_into_linear(gm, lin: torch.fx.Node, z: torch.Tensor, s: torch.Tensor,
                      name: str) -> None:
    w_node = lin.args[1]
    w = G.get_tensor(gm, w_node).detach()
    wf = w.float()
    G.set_tensor(gm, w_node, (wf * s[None, :]).to(w.dtype), f"qexport_os_{name}_weight")
    if bool((z == 0).all()):
        return
    shift = wf @ z
    b_node = lin.args[2] if len(lin.args) > 2 else None
    if b_node is not None:
        b = G.get_tensor(gm, b_node).detach()
        G.set_tensor(gm, b_node, (b.float() + shift).to(b.dtype), f"qexport_os_{name}_bias")
    else:
        new_b = G.new_attr(gm, f"qexport_os_{name}_bias", shift.to(w.dtype), lin)
        lin.args = (lin.args[0], w_node, new_b)
