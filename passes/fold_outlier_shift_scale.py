"""OS+ (Outlier Suppression+): per-channel shift z and scale s folded into norm and Linears.

For the activation X feeding a group of Linears right after a norm:
    z_j = (max X_j + min X_j) / 2      (only where the norm has a bias β to absorb it)
    s_j = max(1, max|X_j - z_j| / t)
Fold: β ← (β - z)/s, γ ← γ/s; every following Linear: W ← W·diag(s), b ← b + W z.
The transformed model computes the same function in exact arithmetic.

t is chosen per norm by `search_shift_scale`, as OS+ does: a grid over t minimising the
quantization error of the group's outputs on sampled calibration tokens, sum over the Linears of
||X' (Q(W') − W')ᵀ||² with X' = (X − z)/s, W' = W·diag(s) and Q the weight quantizer in use.
t = max half-range (s = 1: no scaling) is on the grid, so the search never does worse than no
scaling on that objective. `choose_shift_scale(quantile=...)` is the fixed-quantile heuristic.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

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
    sample: torch.Tensor | None = None  # [rows, K] calibration tokens, for the OS+ search

    @classmethod
    def empty(cls, k: int) -> "OutlierStats":
        return cls(0, torch.full((k,), float("inf"), dtype=torch.float64),
                   torch.full((k,), float("-inf"), dtype=torch.float64),
                   torch.zeros(k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64))

    def update(self, x: torch.Tensor, sample_rows: int = 0) -> None:
        """Add the tokens of x [..., K]; keep `sample_rows` of them, evenly spaced, as samples."""
        x = x.detach().reshape(-1, x.shape[-1]).float()
        self.count += x.shape[0]
        self.min = torch.minimum(self.min, x.amin(0).double())
        self.max = torch.maximum(self.max, x.amax(0).double())
        self.sum += x.sum(0, dtype=torch.float64)
        self.sumsq += x.square().sum(0, dtype=torch.float64)
        if sample_rows > 0:
            rows = x[torch.linspace(0, x.shape[0] - 1, min(sample_rows, x.shape[0])).long()]
            self.sample = rows.clone() if self.sample is None else torch.cat([self.sample, rows])

    @property
    def rms(self) -> torch.Tensor:
        return (self.sumsq / max(self.count, 1)).sqrt()

    def transformed(self, z: torch.Tensor, s: torch.Tensor) -> "OutlierStats":
        """Exact statistics of (X - z) / s (s > 0)."""
        z, s = z.double(), s.double()
        n = self.count
        sumsq = (self.sumsq - 2 * z * self.sum + n * z * z) / (s * s)
        sample = None if self.sample is None else (self.sample - z.float()) / s.float()
        return OutlierStats(n, (self.min - z) / s, (self.max - z) / s, (self.sum - n * z) / s,
                            sumsq, sample)


def _shift_and_half_range(stats: OutlierStats, use_shift: bool):
    z = (stats.max + stats.min) / 2 if use_shift else torch.zeros_like(stats.max)
    return z, torch.maximum((stats.max - z).abs(), (stats.min - z).abs())


def _scale_for(half_range: torch.Tensor, t: float) -> torch.Tensor:
    return torch.clamp(half_range / max(t, 1e-12), min=1.0).float()


def choose_shift_scale(stats: OutlierStats, use_shift: bool, weights=None,
                       t: float | None = None,
                       quantile: float = 0.99) -> tuple[torch.Tensor, torch.Tensor]:
    """z and s for one activation. Without `t`, t is the `quantile` of the per-channel
    half-ranges, so only channels beyond it are scaled down to it. (`weights`: unused, the
    signature `search_shift_scale` shares.)"""
    z, half_range = _shift_and_half_range(stats, use_shift)
    if t is None:
        t = float(torch.quantile(half_range, quantile))
    return z.float(), _scale_for(half_range, t)


# error(layer_name, weight' [N, K], stats of X') -> quantization error of that Linear on the
# sampled X' (0 for a Linear that is not quantized)
QuantError = Callable[[str, torch.Tensor, OutlierStats], float]


def search_shift_scale(stats: OutlierStats, use_shift: bool, weights: dict[str, torch.Tensor],
                       error: QuantError, grid: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """OS+ grid search: the t (from max half-range down to its median, geometric steps)
    whose transform gives the lowest summed quantization error of `weights` (layer name ->
    weight of the Linears fed by the activation). Needs `stats.sample`."""
    if stats.sample is None:
        raise ValueError("the OS+ search needs sampled calibration tokens (stats.sample)")
    z, half_range = _shift_and_half_range(stats, use_shift)
    top = float(half_range.max())
    low = max(float(half_range.median()), top * 1e-3)
    best = None
    for t in torch.logspace(math.log10(top), math.log10(low), max(grid, 2),
                            dtype=torch.float64).tolist():
        s = _scale_for(half_range, t)
        moved = stats.transformed(z, s)
        err = sum(error(name, w.float() * s[None, :], moved) for name, w in weights.items())
        if best is None or err < best[0]:
            best = (err, s)
    return z.float(), best[1]


def fold_outlier_shift_scale(gm: torch.fx.GraphModule, stats: dict[str, OutlierStats],
                             choose=choose_shift_scale,
                             folded: dict[str, str] | None = None) -> PassResult:
    """Fold OS+ into every norm whose consumers are all Linears with statistics.

    `stats` maps layer_name -> statistics of that Linear's input; the entries of folded
    Linears are replaced by the statistics of the transformed input.
    `choose(stats, use_shift, weights) -> (z, s)` picks the transform (weights: layer name ->
    weight of the consuming Linears). `folded`, if given, maps the original name of every tensor changed
    (e.g. 'model.layers.0.input_layernorm.weight'; a bias that didn't exist: '<layer>.bias')
    to the attribute of `gm` now holding it, so an eager copy of the model can follow.
    """
    folded = {} if folded is None else folded
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
