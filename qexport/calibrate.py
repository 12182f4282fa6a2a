"""Calibration: per-channel statistics of every Linear's input, recorded on the traced graph."""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.fx

from passes import OutlierStats, layer_name, linear_nodes


class _Recorder(torch.fx.Interpreter):
    def __init__(self, gm, watched: set[torch.fx.Node], stats: dict[str, OutlierStats]):
        super().__init__(gm)
        self.watched, self.stats = watched, stats

    def run_node(self, n):
        if n in self.watched:
            x = self.env[n.args[0]]
            name = layer_name(n)
            if name not in self.stats:
                self.stats[name] = OutlierStats.empty(x.shape[-1])
            self.stats[name].update(x)
        return super().run_node(n)


@torch.no_grad()
def collect_linear_input_stats(gm: torch.fx.GraphModule, batches: Iterable[tuple],
                               progress: Callable[[int], None] | None = None
                               ) -> dict[str, OutlierStats]:
    """Run `gm` on each batch (a tuple of inputs) and return layer_name -> OutlierStats."""
    stats: dict[str, OutlierStats] = {}
    recorder = _Recorder(gm, set(linear_nodes(gm)), stats)
    for i, batch in enumerate(batches):
        recorder.run(*batch)
        if progress:
            progress(i + 1)
    return stats
