"""GPTQ (Frantar et al. 2022): Hessians of Linear inputs over calibration tokens, and
column-by-column quantization with error compensation. Used by the baselines
(`qexport.baselines`) and by `refine_codes`, which gives an all-4-bit op (a w4 head) GPTQ codes
on its round-to-nearest grid.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from .ops.binary_mixed_linear import contract as C
from .ops.binary_mixed_linear.packing import MixedLinearWeights, pack_nibbles


class _AllReached(Exception):
    """Raised by the hooks to end a forward whose remaining work no Hessian needs."""


@torch.no_grad()
def linear_input_hessians(module: torch.nn.Module, calib_ids: torch.Tensor, batch_size: int = 1,
                          include: Callable[[str], bool] | None = None,
                          forward: Callable[[torch.Tensor], object] | None = None
                          ) -> dict[str, torch.Tensor]:
    """H = 2·XᵀX/n (float64 sums, float32 result) of every Linear's input X [n tokens, K] over
    `calib_ids`, keyed by module path; forward pre-hooks, arguments as `ptq161.linear_input_rms`.

    Collected on the fp model in one pass: every layer's H comes from fp inputs, whereas GPTQ,
    PB-LLM and BiLLM collect it layer by layer on the inputs of the already quantized model.
    Linears fed the same tensor (q/k/v, gate/up) share one XᵀX product per batch. A batch's
    forward stops once every included Linear has been reached (for the output head alone:
    before the head's product, which with a large vocabulary costs more than the rest)."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    seen: dict[int, tuple] = {}  # id(input) -> (input kept alive, XᵀX, n) within one batch
    handles = []
    wanted = [name for name, m in module.named_modules()
              if isinstance(m, torch.nn.Linear) and (include is None or include(name))]
    reached: set[str] = set()  # this batch's
    for name in wanted:
        def hook(mod, args, name=name):
            x = args[0]
            if id(x) not in seen:
                x2 = x.detach().reshape(-1, x.shape[-1]).float()
                seen[id(x)] = (x, (x2.T @ x2).double(), x2.shape[0])
            _, xtx, n = seen[id(x)]
            sums[name] = sums[name].add_(xtx) if name in sums else xtx.clone()
            counts[name] = counts.get(name, 0) + n
            reached.add(name)
            if len(reached) == len(wanted):
                raise _AllReached
        handles.append(module.get_submodule(name).register_forward_pre_hook(hook))
    try:
        for s in range(0, calib_ids.shape[0], batch_size):
            try:
                (forward or module)(calib_ids[s:s + batch_size])
            except _AllReached:
                pass
            seen.clear()
            reached.clear()
    finally:
        for h in handles:
            h.remove()
    return {k: (2 * v / counts[k]).float() for k, v in sums.items()}


def prepare(weight: torch.Tensor, hessian: torch.Tensor | None, percdamp: float):
    """-> (W float64 with dead columns zeroed, U): U the upper Cholesky factor of (H + λI)⁻¹,
    λ = percdamp · mean diag H (raised ×10 until H + λI factors). Dead columns (H_cc = 0: the
    input is always 0) get H_cc = 1 and W[:, c] = 0, as in GPTQ. hessian=None: H = I."""
    w = weight.detach().to(torch.float64).clone()
    k = w.shape[1]
    h = torch.eye(k, dtype=torch.float64) if hessian is None else hessian.to(torch.float64).clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    damp = percdamp * torch.diagonal(h).mean()
    for _ in range(6):
        chol, info = torch.linalg.cholesky_ex(h + damp * torch.eye(k, dtype=torch.float64))
        if info == 0:
            break
        damp = damp * 10
    else:
        raise ValueError("Hessian not positive definite even with 1e5x the dampening")
    return w, torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)


def gptq(w: torch.Tensor, u: torch.Tensor, make_quantizer, block: int = 128,
          compensate: bool = True) -> torch.Tensor:
    """GPTQ (Frantar et al. 2022) with lazy batch updates; returns the quantized W.

    Per block of `block` columns, `make_quantizer(W_block, U_block, start)` fixes the block's
    parameters from its weights as they stand (after the compensation of the earlier blocks) and
    returns `quant(i, w_col) -> q_col`; the columns are then quantized left to right, each error
    e = (w − q)/U_ii propagated at once to the later columns of the block and once per block to
    the rest of W. compensate=False: the same quantizers on the uncompensated weights."""
    w, q = w.clone(), torch.zeros_like(w)
    for b0 in range(0, w.shape[1], block):
        b1 = min(b0 + block, w.shape[1])
        w1, u1 = w[:, b0:b1].clone(), u[b0:b1, b0:b1]
        quant = make_quantizer(w1.clone(), u1, b0)
        err = torch.zeros_like(w1)
        for i in range(b1 - b0):
            q[:, b0 + i] = quant(i, w1[:, i])
            if compensate:
                err[:, i] = (w1[:, i] - q[:, b0 + i]) / u1[i, i]
                w1[:, i:] -= err[:, i:i + 1] * u1[i:i + 1, i:]
        if compensate:
            w[:, b1:] -= err @ u[b0:b1, b1:]
    return q


# Bytes of W (float64 rows) refine_codes hands GPTQ at a time (measured: 1 MiB 4.1 s, 4 MiB
# 3.8 s, 16 MiB 3.8 s, all at once 10.4 s for a 262144 x 128 head).
REFINE_CHUNK_BYTES = 4 << 20


def refine_codes(packed: MixedLinearWeights, weight: torch.Tensor, hessian: torch.Tensor,
                 block: int = 128, percdamp: float = 0.01) -> MixedLinearWeights:
    """The same op with its 4-bit codes chosen by GPTQ instead of round to nearest.

    For ops whose every input channel is salient (w4: `salient_idx` = 0..K-1). The grid stays
    the one `packed` stores (per row and group: fp16 scale, zero point, from the weights before
    compensation, as GPTQ's static groups), so only the codes change and the op's format,
    size and kernels do not. Rows are independent here (per-row grids, one H), so they go
    through GPTQ in chunks that stay in cache: a 262144-row head took 10.4 s in one piece
    and 3.8 s in chunks of 4 MiB, with the same codes (docs/performance.md)."""
    k, n = packed.in_features, packed.out_features
    if packed.num_binary or not torch.equal(packed.salient_idx.long(), torch.arange(k)):
        raise ValueError("refine_codes wants an op whose every input channel is salient, in order")
    g = packed.salient_group_size or k
    scale = packed.salient_scale.double()
    zero = packed.salient_zero.double()
    codes = torch.zeros(n, k, dtype=torch.uint8)
    w, u = prepare(weight, hessian, percdamp)

    rows = max(1, REFINE_CHUNK_BYTES // (8 * k))
    for r0 in range(0, n, rows):
        r1 = min(r0 + rows, n)

        def make_quantizer(w1, u1, b0, r0=r0, r1=r1):
            def quant(i, col):
                s, z = scale[r0:r1, (b0 + i) // g], zero[r0:r1, (b0 + i) // g]
                q = torch.round(col / s + z).clamp(0, C.SALIENT_QMAX)
                codes[r0:r1, b0 + i] = q.to(torch.uint8)
                return (q - z) * s
            return quant
        gptq(w[r0:r1], u, make_quantizer, block)
    out = dataclasses.replace(packed, salient_packed=pack_nibbles(codes))
    out.validate()
    return out
