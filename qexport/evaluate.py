"""Perplexity over non-overlapping windows, for a PyTorch module or an ONNX Runtime session.

Protocol: the tokens are cut into `len(tokens) // window` windows of `window` tokens (the
tail that does not fill a window is dropped; a text shorter than one window is one window);
in each window, positions 1..window-1 are predicted from the previous ones in that window.
Perplexity = exp(total NLL / number of predicted tokens), accumulated in float64.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch

from qexport.errors import QexportError

LogitsFn = Callable[[torch.Tensor], Any]


def perplexity(logits_fn: LogitsFn, tokens: torch.Tensor, window: int = 512, batch: int = 1,
               progress: Callable[[int, int], None] | None = None) -> float:
    """Perplexity of `tokens` (LongTensor[T]) under `logits_fn(ids[B, window]) -> [B, window, V]`.

    `progress(done_windows, total_windows)` is called after each batch when given.
    """
    tokens = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
    if tokens.numel() < 2:
        raise QexportError(f"perplexity needs at least 2 tokens, got {tokens.numel()}")
    if window < 2 or batch < 1:
        raise QexportError(f"perplexity needs window >= 2 and batch >= 1, got {window}, {batch}")
    window = min(window, tokens.numel())
    n_windows = tokens.numel() // window
    windows = tokens[: n_windows * window].view(n_windows, window)
    total_nll, count = 0.0, 0
    for start in range(0, n_windows, batch):
        ids = windows[start:start + batch]
        logits = _as_tensor(logits_fn(ids))
        if logits.dim() != 3 or logits.shape[:2] != ids.shape:
            raise QexportError(f"the model returned logits of shape {tuple(logits.shape)} for "
                               f"input ids of shape {tuple(ids.shape)}; expected [B, T, vocab]")
        for row in range(ids.shape[0]):  # one row at a time bounds the float64 copy
            logp = torch.log_softmax(logits[row, :-1].to(torch.float64), dim=-1)
            target = ids[row, 1:]
            if int(target.max()) >= logp.shape[-1]:
                raise QexportError(f"token id {int(target.max())} is outside the model's "
                                   f"vocabulary of {logp.shape[-1]}")
            total_nll -= float(logp.gather(-1, target.unsqueeze(-1)).sum())
            count += target.numel()
        if progress is not None:
            progress(min(start + batch, n_windows), n_windows)
    return math.exp(total_nll / count)


def _as_tensor(out: Any) -> torch.Tensor:
    if hasattr(out, "logits"):
        out = out.logits
    elif isinstance(out, (tuple, list)):
        out = out[0]
    if isinstance(out, np.ndarray):
        return torch.from_numpy(out)
    return torch.as_tensor(out).detach()


def torch_logits_fn(module: torch.nn.Module) -> LogitsFn:
    """`ids -> logits` for a PyTorch module taking input_ids (no grad)."""
    def fn(ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return _as_tensor(module(ids))
    return fn


def ort_logits_fn(session: Any) -> LogitsFn:
    """`ids -> logits` for an onnxruntime.InferenceSession whose first input is the token ids."""
    name = session.get_inputs()[0].name

    def fn(ids: torch.Tensor) -> np.ndarray:
        arr = np.ascontiguousarray(np.asarray(ids, dtype=np.int64))
        return session.run(None, {name: arr})[0]
    return fn


def perplexities(eval_ids: torch.Tensor, window: int, source: str,
                 say: Callable[[str], None], **models) -> dict:
    """Perplexity of each named model (a torch module or an ORT session) on the same tokens."""
    window = min(window, eval_ids.numel())
    out = {"text": source, "tokens": int(eval_ids.numel()), "window": window}
    for key, m in models.items():
        fn = ort_logits_fn(m) if hasattr(m, "get_inputs") else torch_logits_fn(m)
        say(f"perplexity ({key}) on {eval_ids.numel()} tokens")
        out[key] = perplexity(fn, eval_ids, window=window)
    return out
