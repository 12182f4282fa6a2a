"""Model families: what qexport needs to know about an architecture, one adapter per family.

A `Family` says where a model keeps its transformer blocks (PTQ1.61 learns block by block),
which Linears are the output head and embeddings (kept out of the main scheme), how long a
context it takes, and, where the family has them, an attention swap for export (its attention
blocks as single runtime ops) and a KV-cache decoder wrapper. `detect(module)` picks the
adapter from the Hugging Face config's `model_type` (through qexport's causal-LM wrapper);
any other module gets `GENERIC`, which finds blocks by shape and has neither a swap nor a
KV cache. docs/extending.md lists what adding a family touches.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable

import torch

from ..config import HEAD_NAMES, head_pattern
from ..errors import QexportError
from ..registry import Registry


@dataclasses.dataclass(frozen=True)
class Family:
    """One architecture family. Paths are relative to the Hugging Face model (the causal-LM
    class or its base model); `find_blocks` also tries them under qexport's wrapper."""
    name: str
    model_types: tuple[str, ...] = ()  # Hugging Face config.model_type values
    block_paths: tuple[str, ...] = ()  # ModuleList of the transformer blocks
    head_names: tuple[str, ...] = HEAD_NAMES
    context_attrs: tuple[str, ...] = ("max_position_embeddings", "n_positions")
    context_reserved: int = 0  # positions of the table no token gets (RoBERTa: 2)
    # module -> context manager swapping attention blocks for single ops while tracing
    # (yields how many it swapped); None: the family has none
    attention_swap: Callable[[torch.nn.Module], contextlib.AbstractContextManager] | None = None
    traced_attention: str = "it has no fused attention"  # why, without a swap (the report)
    # module -> the KV-cache decoder (see families/attention.py `WithPast`), and why it can't be
    # built for a module (None when it can); None: the family has no KV-cache export
    with_past: Callable[[torch.nn.Module], torch.nn.Module] | None = None
    kv_cache_unsupported: Callable[[torch.nn.Module], str | None] | None = None
    # module -> None: rewrites a freshly loaded model in place into the form the passes read
    # (e.g. GPT-2's Conv1D projections as nn.Linear), computing the same function; run by the
    # loader on the models it owns (qexport.models)
    normalize: Callable[[torch.nn.Module], None] | None = None

    @property
    def skip_pattern(self) -> str:
        return head_pattern(self.head_names)

    def swap_attention(self, module: torch.nn.Module):
        """The attention swap's context for `module` (a no-op context for families without)."""
        if self.attention_swap is None:
            return contextlib.nullcontext(0)
        return self.attention_swap(module)

    def kv_cache_reason(self, module: torch.nn.Module) -> str | None:
        """Why no KV-cache decoder can be exported for `module`, or None."""
        if self.with_past is None:
            return f"the {self.name} family has no KV-cache export yet"
        return self.kv_cache_unsupported(module) if self.kv_cache_unsupported else None

    def max_context(self, module: torch.nn.Module) -> int | None:
        """The longest sequence the model takes (its position table), None when unbounded or
        unknown."""
        cfg = hf_config(module)
        for attr in self.context_attrs:
            value = getattr(cfg, attr, None)
            if isinstance(value, int) and value > self.context_reserved:
                return value - self.context_reserved
        return None

    def find_blocks(self, module: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
        """(path, ModuleList) of the transformer blocks of `module`: the family's paths first
        (directly or under qexport's wrapper, `model.`), else the single ModuleList of
        same-type blocks that hold Linears."""
        modules = dict(module.named_modules())
        tried = [p for path in self.block_paths for p in (path, f"model.{path}")]
        for path in tried:
            m = modules.get(path)
            if isinstance(m, torch.nn.ModuleList) and len(m) and _has_linear(m[0]):
                return path, m
        found = [(p, m) for p, m in modules.items()
                 if isinstance(m, torch.nn.ModuleList) and len(m)
                 and len({type(b) for b in m}) == 1 and _has_linear(m[0])]
        if len(found) == 1:
            return found[0]
        what = ("no ModuleList of transformer blocks" if not found else
                "several candidate block lists: " + ", ".join(p for p, _ in found))
        raise QexportError(
            f"PTQ1.61 learning needs the model's transformer blocks, but found {what} in "
            f"{type(module).__name__} (family {self.name}"
            + (f"; its layouts: {', '.join(tried)})" if tried else ")"))


def _has_linear(m: torch.nn.Module) -> bool:
    return any(isinstance(x, torch.nn.Linear) for x in m.modules())


def hf_config(module: torch.nn.Module):
    """The Hugging Face config of `module`, or of the first Hugging Face model inside it (as in
    qexport's causal-LM wrapper or a user's own wrapper), or None."""
    for m in module.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and isinstance(getattr(cfg, "model_type", None), str):
            return cfg
    return None


# Any other model: blocks at the common layouts (Llama-like, OPT-like, GPT-2-like), else the
# single ModuleList of same-type blocks; no attention swap, no KV cache.
GENERIC = Family("generic", block_paths=("model.layers", "layers", "model.decoder.layers",
                                         "decoder.layers", "transformer.h", "h"))
# The adapter modules, imported (and so registered) on first use; one line per module.
_REGISTRY: Registry[Family] = Registry(__name__, ("llama", "gemma", "opt", "gpt2", "bert"),
                                       "model_type")


def register(family: Family) -> Family:
    for model_type in family.model_types:
        _REGISTRY.add(model_type, family)
    return family


def families() -> list[Family]:
    return _REGISTRY.rows()


def detect(module: torch.nn.Module) -> Family:
    """The adapter of `module`'s family (by its Hugging Face model_type), else GENERIC."""
    cfg = hf_config(module)
    return _REGISTRY.get(getattr(cfg, "model_type", None), GENERIC)


def find_blocks(module: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The transformer blocks of `module`, through its family's adapter."""
    return detect(module).find_blocks(module)
