"""OS+ (Outlier Suppression+) parameters: per-channel statistics of an activation and the
choice of its shift z and scale s (the fold itself is the graph pass
passes.fold_outlier_shift_scale, which is handed a `choose` from here).

    z_j = (max X_j + min X_j) / 2      (only where the norm has a bias β to absorb it)
    s_j = max(1, max|X_j - z_j| / t)

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
