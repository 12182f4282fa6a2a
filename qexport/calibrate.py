"""Calibration: per-channel statistics of every Linear's input, recorded on the traced graph."""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.fx

from .graph import layer_name, linear_nodes, norm_fed
from .outlier import OutlierStats


class _Recorder(torch.fx.Interpreter):
    """Updates one OutlierStats per distinct Linear input (q/k/v share theirs)."""

    def __init__(self, gm, inputs: dict[torch.fx.Node, tuple[list, int]]):
        super().__init__(gm)
        self.inputs = inputs  # input node -> ([stats, created on first use], rows per batch)
        self.needed = _ancestors(list(inputs))

    def run_node(self, n):
        if n.op not in ("placeholder", "get_attr", "output") and n not in self.needed:
            return None  # computes nothing the statistics read (e.g. the output head)
        out = super().run_node(n)
        if n in self.inputs:
            holder, rows = self.inputs[n]
            if holder[0] is None:
                holder[0] = OutlierStats.empty(out.shape[-1])
            holder[0].update(out, rows)
        return out


def _ancestors(nodes: list[torch.fx.Node]) -> set[torch.fx.Node]:
    """`nodes` and every node they depend on."""
    out, todo = set(), list(nodes)
    while todo:
        n = todo.pop()
        if n in out:
            continue
        out.add(n)
        todo.extend(n.all_input_nodes)
    return out


@torch.no_grad()
def collect_linear_input_stats(gm: torch.fx.GraphModule, batches: Iterable[tuple],
                               progress: Callable[[int], None] | None = None,
                               sample_tokens: int = 0) -> dict[str, OutlierStats]:
    """Run `gm` on each batch (a tuple of inputs) and return layer_name -> OutlierStats.

    Linears fed by the same value share one statistics object. Only the part of the graph the
    Linears' inputs depend on runs (not the output head's product, nor what follows it). `sample_tokens`: keep about
    that many input tokens (evenly spread over the batches) of every Linear fed by a norm, for
    the OS+ search (memory: sample_tokens x K fp32 per norm)."""
    batches = list(batches)
    per_batch = -(-sample_tokens // max(len(batches), 1)) if sample_tokens > 0 else 0
    inputs: dict[torch.fx.Node, tuple[list, int]] = {}
    names: dict[torch.fx.Node, list[str]] = {}
    for lin in linear_nodes(gm):
        x = lin.args[0]
        if x not in inputs:
            inputs[x] = ([None], per_batch if norm_fed(gm, lin) else 0)
            names[x] = []
        names[x].append(layer_name(lin))
    recorder = _Recorder(gm, inputs)
    for i, batch in enumerate(batches):
        recorder.run(*batch)
        if progress:
            progress(i + 1)
    return {name: inputs[x][0][0] for x, ns in names.items() for name in ns
            if inputs[x][0][0] is not None}
