from __future__ import annotations

import dataclasses
import time
from typing import Callable

import torch.fx


@dataclasses.dataclass
class PassResult:
    graph_module: torch.fx.GraphModule
    modified: bool
    notes: list[str] = dataclasses.field(default_factory=list)


class PassManager:
    """Runs passes in order; after each: graph lint, recompile, then the optional `check`
    (e.g. run a sample input and compare against the model before the pass)."""

    def __init__(self, passes: list[Callable[[torch.fx.GraphModule], PassResult]],
                 check: Callable[[str, torch.fx.GraphModule], None] | None = None):
        self.passes = passes
        self.check = check
        self.timings: dict[str, float] = {}
        self.notes: dict[str, list[str]] = {}

    def __call__(self, gm: torch.fx.GraphModule) -> PassResult:
        modified = False
        for p in self.passes:
            name = getattr(p, "__name__", type(p).__name__)
            t0 = time.perf_counter()
            result = p(gm)
            gm = result.graph_module
            gm.graph.lint()
            gm.graph.eliminate_dead_code()
            gm.recompile()
            if self.check is not None:
                self.check(name, gm)
            self.timings[name] = time.perf_counter() - t0
            self.notes[name] = result.notes
            modified |= result.modified
        return PassResult(gm, modified)
