"""PTQ1.61 as published: learned block-wise scales for the w1.61 linear.

For every Linear inside a transformer block, with W [N, K], salient input channels S (4-bit RTN,
frozen) and the binary columns B = the other channels, the binary part is

    Wq[n, c] = r2[c] · r1[n] · (α[n] · sign(W[n, c] − μ[n]) + μ[n])        (c ∈ B)

with μ[n] the row mean of W[n, B] (frozen), the signs frozen, and α (init mean |W − μ| per
row, the closed form of `quantizers.quantize_mixed`), r1 (per row, init 1) and r2 (per binary
input channel, init 1) learned per block with AdamW on (paper Eq. 5-6, 9)

    L = MSE(F(W, X), F(Wq, Xq)) + MSE(F(W, Xq), F(Wq, Xq))
        − log cos(F(W, X), F(Wq, Xq)) − log cos(F(W, Xq), F(Wq, Xq))

where F is the block, X its fp input and Xq its input in the model whose earlier blocks are
already quantized. Since the signs are frozen, Wq is a differentiable function of α, r1, r2 and
no straight-through estimator is needed. α is optimized as α0·a (a starts at 1) so that one
learning rate suits every layer whatever its weight scale (same optimum, per-row step size).

After a block is learned its factors fold into the packed format (docs/format.md):
row_scale = r1·α, row_offset = r1·μ, r2 stored, all in fp16; the next block's quantized input is
computed with exactly those fp16 weights, so what is learned is what is exported.

Memory: one block's parameters plus four activation tensors [n_samples, L, D] in fp32 on the CPU
(or memory-mapped files under `LearnConfig.spill_dir`).
"""
from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch.func import functional_call

from . import checkpoint
from .config import LearnConfig
from .errors import QexportError
from .families import find_blocks
from .ops.binary_mixed_linear.packing import MixedLinearWeights, binary_channels, unpack_signs
from .quantizers import quantize_mixed

# --------------------------------------------------------------------------- one learned Linear

class LearnedLinear(torch.nn.Module):
    """Learnable factors of one Linear (α as α0·a, r1, r2); signs, μ and 4-bit part frozen."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, salient_idx: torch.Tensor,
                 salient_group_size: int):
        super().__init__()
        self.closed_form = quantize_mixed(weight, bias, salient_idx, salient_group_size)
        w = weight.detach().float()
        n, k = w.shape
        self.n, self.k = n, k
        sal = self.closed_form.salient_idx.long()
        binc = binary_channels(k, sal)
        wb = w[:, binc]
        kb = wb.shape[1]
        self.kb = kb
        if kb:
            mu = wb.mean(1)
            alpha0 = (wb - mu[:, None]).abs().mean(1)
            signs = unpack_signs(self.closed_form.sign_packed, kb)
        else:
            mu = alpha0 = torch.zeros(n)
            signs = torch.zeros(n, 0)
        self.register_buffer("signs", signs)
        self.register_buffer("mu", mu)
        self.register_buffer("alpha0", alpha0.clamp(min=1e-12))
        self.register_buffer("w_salient", self.closed_form._salient_dequant() if sal.numel()
                             else torch.zeros(n, 0))
        # Wq = cat([binary cols, salient cols])[:, inverse permutation]
        perm = torch.cat([binc, sal])
        self.register_buffer("inv_perm", torch.argsort(perm))
        self.a = torch.nn.Parameter(torch.ones(n))
        self.r1 = torch.nn.Parameter(torch.ones(n))
        self.r2 = torch.nn.Parameter(torch.ones(kb))

    def row_scale(self) -> torch.Tensor:  # r1·α
        return self.r1 * self.alpha0 * self.a

    def row_offset(self) -> torch.Tensor:  # r1·μ
        return self.r1 * self.mu

    def weight(self, rounded: bool = False) -> torch.Tensor:
        """Wq [N, K]; `rounded`: from the fp16 values that are stored (no gradient needed)."""
        A, M, r2 = self.row_scale(), self.row_offset(), self.r2
        if rounded:
            A, M, r2 = A.half().float(), M.half().float(), r2.half().float()
        wb = (A[:, None] * self.signs + M[:, None]) * r2[None, :]
        return torch.cat([wb, self.w_salient], dim=1)[:, self.inv_perm]

    @torch.no_grad()
    def pack(self) -> MixedLinearWeights:
        packed = dataclasses.replace(self.closed_form, row_scale=self.row_scale().half(),
                                     row_offset=self.row_offset().half(),
                                     r2=self.r2.detach().half().clone())
        packed.validate()
        return packed


# --------------------------------------------------------------------------- activations

class _Activations:
    """[n, L, D] fp32 tensors on the CPU, or memory-mapped files when `spill_dir` is set."""

    def __init__(self, spill_dir: str | None):
        self.dir = None
        if spill_dir:
            os.makedirs(spill_dir, exist_ok=True)
            self.dir = tempfile.mkdtemp(prefix="qexport-ptq161-", dir=spill_dir)
        self.count = 0

    def new(self, shape) -> torch.Tensor:
        if self.dir is None:
            return torch.empty(shape, dtype=torch.float32)
        self.count += 1
        path = os.path.join(self.dir, f"act{self.count}.bin")
        return torch.from_file(path, shared=True, size=math.prod(shape),
                               dtype=torch.float32).view(shape)

    def close(self) -> None:
        if self.dir is not None:
            import shutil
            shutil.rmtree(self.dir, ignore_errors=True)


class _Stop(Exception):
    pass


def _capture_block0_inputs(module, block0, ids, batch_size, store: _Activations):
    """fp inputs of block 0 for every row of ids, and the other args/kwargs of its call."""
    captured: dict = {}

    def hook(mod, args, kwargs):
        captured["args"], captured["kwargs"] = args, kwargs
        raise _Stop

    handle = block0.register_forward_pre_hook(hook, with_kwargs=True)
    x = None
    try:
        with torch.no_grad():
            for start in range(0, ids.shape[0], batch_size):
                try:
                    module(ids[start:start + batch_size])
                except _Stop:
                    pass
                else:
                    raise QexportError("PTQ1.61: the forward pass never reached the first block")
                args, kwargs = captured["args"], captured["kwargs"]
                hidden = args[0] if args else kwargs.pop("hidden_states")
                if x is None:
                    x = store.new((ids.shape[0],) + tuple(hidden.shape[1:]))
                    extra = (tuple(args[1:]), dict(kwargs))
                x[start:start + hidden.shape[0]] = hidden.float()
    finally:
        handle.remove()
    return x, extra


def _batch_extra(extra, b: int):
    """The captured block args/kwargs (from a batch-1 call) broadcast to a batch of b rows."""
    def fit(v):
        if isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[0] == 1 and b != 1:
            return v.expand(b, *v.shape[1:])
        if isinstance(v, tuple):
            return tuple(fit(u) for u in v)
        return v
    args, kwargs = extra
    return tuple(fit(a) for a in args), {k: fit(v) for k, v in kwargs.items()}


def _out(o):
    return o[0] if isinstance(o, (tuple, list)) else o


# --------------------------------------------------------------------------- loss

def block_loss(q: torch.Tensor, t_fp: torch.Tensor, t_q: torch.Tensor,
               config: LearnConfig) -> torch.Tensor:
    """MSE (config.mse_norm) and −log cos of the quantized block output q against both fp
    targets."""
    loss = q.new_zeros(())
    for t in (t_fp, t_q):
        if config.mse_weight:
            if config.mse_norm == "token":
                err = (q - t).pow(2).sum(-1) / t.pow(2).sum(-1).clamp(min=1e-12)
                loss = loss + config.mse_weight * err.mean()
            else:
                loss = loss + config.mse_weight * F.mse_loss(q, t)
        if config.cos_weight:
            cos = F.cosine_similarity(q, t, dim=-1).mean()
            loss = loss - config.cos_weight * torch.log(cos.clamp(min=1e-6))
    return loss


# --------------------------------------------------------------------------- the learning

def learn_mixed_weights(module: torch.nn.Module, calib_ids: torch.Tensor,
                        salient: dict[str, torch.Tensor], salient_group_size: int,
                        config: LearnConfig | None = None,
                        progress: Callable[[str], None] | None = None,
                        include: Callable[[str], bool] | None = None,
                        blocks: tuple[str, torch.nn.ModuleList] | None = None,
                        checkpoint_dir: str | os.PathLike | None = None
                        ) -> dict[str, MixedLinearWeights]:
    """Learn α, r1, r2 block by block; return the packed weights of every Linear in the blocks.

    module: the fp model taking `calib_ids[i:j]` (e.g. `load_model(...).module`); not modified.
    calib_ids: LongTensor [n, L] calibration sequences (first `config.n_samples` rows are used).
    salient: layer name (module path in `module`) -> salient input channel indices.
    include: optional filter on layer names (a Linear it rejects keeps fp weights in the
        quantized model used to compute the following blocks' inputs, and is not returned).
    blocks: (path, ModuleList) of the transformer blocks [default: families.find_blocks].
    checkpoint_dir: a work folder that keeps each finished block (qexport.checkpoint); a run
        given the folder of an interrupted one with the same inputs continues after its last
        finished block, with the same result as an uninterrupted run.
    """
    config = config or LearnConfig()
    say = progress or (lambda msg: None)
    ids = calib_ids[:config.n_samples] if config.n_samples else calib_ids
    if ids.dim() != 2 or ids.shape[0] < 1:
        raise QexportError(f"PTQ1.61 needs calibration ids of shape [n, L], got {tuple(ids.shape)}")
    path, blocks = blocks or find_blocks(module)
    names = [f"{path}.{bi}.{sub}" for bi, block in enumerate(blocks)
             for sub, m in block.named_modules() if isinstance(m, torch.nn.Linear)]
    names = [n for n in names if include is None or include(n)]
    missing = [n for n in names if n not in salient]
    if missing:
        raise QexportError(f"PTQ1.61: no salient channels given for {len(missing)} Linear(s), "
                           f"e.g. {missing[0]}")

    requires = {p: p.requires_grad for p in module.parameters()}
    for p in requires:
        p.requires_grad_(False)
    store = _Activations(config.spill_dir)
    out: dict[str, MixedLinearWeights] = {}
    n, bs = ids.shape[0], max(1, config.batch_size)
    gen = torch.Generator().manual_seed(config.seed)
    ckpt = resumed = None
    t_start = time.perf_counter()
    first_block = 0
    try:
        if checkpoint_dir is not None:
            settings = {**config.as_dict(), "spill_dir": None, "group_size": salient_group_size,
                        "names": names, "path": path, "blocks": len(blocks)}
            ckpt = checkpoint.BlockCheckpoint(
                checkpoint_dir, checkpoint.fingerprint(
                    module, ids, {k: salient[k] for k in names}, settings), len(blocks))
            resumed = ckpt.load(MixedLinearWeights, say)
        say(f"PTQ1.61: capturing the inputs of {path}.0 on {n}x{ids.shape[1]} tokens")
        x_fp, extra = _capture_block0_inputs(module, blocks[0], ids, 1, store)
        x_q = store.new(x_fp.shape)
        x_q.copy_(x_fp)
        if resumed is not None:
            first_block = resumed.next_block
            x_fp.copy_(resumed.x_fp)
            x_q.copy_(resumed.x_q)
            gen.set_state(resumed.generator_state)
            out.update(resumed.packed)
            say(f"PTQ1.61: resuming after block {first_block}/{len(blocks)} from {checkpoint_dir}")
            del resumed
        y_fp, y_fpq = store.new(x_fp.shape), store.new(x_fp.shape)
        batches = [(s, min(s + bs, n)) for s in range(0, n, bs)]
        extras = {e - s: _batch_extra(extra, e - s) for s, e in batches}

        def run(block, params, x, y):
            with torch.no_grad():
                for s, e in batches:
                    args, kwargs = extras[e - s]
                    y[s:e] = _out(functional_call(block, params, (x[s:e],) + args, kwargs))

        for bi, block in enumerate(blocks):
            if bi < first_block:
                continue
            t0 = time.perf_counter()
            prefix = f"{path}.{bi}."
            learned = {sub: LearnedLinear(m.weight, m.bias, salient[prefix + sub],
                                          salient_group_size)
                       for sub, m in block.named_modules()
                       if isinstance(m, torch.nn.Linear) and prefix + sub in names}
            if config.share_r2:
                s, e = batches[0]
                _share_r2(block, learned, x_fp[s:e], *extras[e - s])
            run(block, {}, x_fp, y_fp)  # fp target; also the next block's fp input
            run(block, {}, x_q, y_fpq)
            first, last = _optimize(block, learned, batches, extras, x_q, y_fp, y_fpq, config,
                                    gen)
            packs = {sub: ll.pack() for sub, ll in learned.items()}
            for sub, pk in packs.items():
                out[prefix + sub] = pk
            # next block's quantized input, with exactly the stored (fp16) weights
            run(block, {f"{sub}.weight": pk.dequantize() for sub, pk in packs.items()}, x_q, x_q)
            x_fp, y_fp = y_fp, x_fp
            if ckpt is not None:
                ckpt.save(bi, {prefix + sub: pk for sub, pk in packs.items()}, x_fp, x_q, gen)
            dt = time.perf_counter() - t0
            done = time.perf_counter() - t_start
            eta = done / (bi + 1 - first_block) * (len(blocks) - bi - 1)
            mse = float(F.mse_loss(x_q, x_fp)) if n * x_q[0].numel() <= 2 ** 26 else \
                float(F.mse_loss(x_q[:4], x_fp[:4]))
            say(f"PTQ1.61: block {bi + 1}/{len(blocks)}: {len(learned)} Linears, loss "
                f"{first:.4g} (first step) -> {last:.4g} (epoch {config.epochs} mean), "
                f"output MSE vs fp {mse:.4g}, {dt:.1f}s, ETA {eta:.0f}s")
    finally:
        store.close()
        for p, r in requires.items():
            p.requires_grad_(r)
    return out


def _optimize(block, learned: dict[str, "LearnedLinear"], batches, extras, x_q, y_fp, y_fpq,
              config: LearnConfig, gen: torch.Generator) -> tuple[float, float]:
    """AdamW on the block's α, r1, r2 for config.epochs epochs over the batches (in an order
    drawn from `gen`); returns the first step's loss and the mean loss of the last epoch."""
    r2s = {id(mods.r2): mods.r2 for mods in learned.values() if mods.kb}  # shared: once
    params = [(mods.a, config.lr_alpha) for mods in learned.values()] + \
        [(mods.r1, config.lr_r1) for mods in learned.values()] + \
        [(r2, config.lr_r2) for r2 in r2s.values()]
    opt = torch.optim.AdamW([{"params": [p], "lr": lr} for p, lr in params],
                            weight_decay=config.weight_decay) if learned else None
    n = batches[-1][1] if batches else 0
    first = last = float("nan")
    for epoch in range(config.epochs if learned else 0):
        total = 0.0
        for j in torch.randperm(len(batches), generator=gen).tolist():
            s, e = batches[j]
            args, kwargs = extras[e - s]
            weights = {f"{sub}.weight": ll.weight() for sub, ll in learned.items()}
            q = _out(functional_call(block, weights, (x_q[s:e],) + args, kwargs))
            loss = block_loss(q, y_fp[s:e], y_fpq[s:e], config)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * (e - s)
            if first != first:
                first = float(loss.detach())
        last = total / n
    return first, last


# --------------------------------------------------------------------------- helpers

@torch.no_grad()
def _share_r2(block: torch.nn.Module, learned: dict[str, LearnedLinear], x: torch.Tensor,
              args: tuple, kwargs: dict) -> None:
    """Give the learned Linears of `block` that read the same input tensor (seen in one
    forward on `x`) and have the same salient channels one shared r2 Parameter."""
    seen: dict[str, torch.Tensor] = {}  # held, so that no address is reused during the forward
    hooks = [m.register_forward_pre_hook(lambda mod, a, sub=sub: seen.setdefault(sub, a[0]))
             for sub, m in block.named_modules() if sub in learned]
    try:
        _out(block(x, *args, **kwargs))
    finally:
        for h in hooks:
            h.remove()
    leaders: dict[int, list[LearnedLinear]] = {}
    for sub, ll in learned.items():
        if sub not in seen or not ll.kb:
            continue
        for leader in leaders.setdefault(id(seen[sub]), []):
            if torch.equal(leader.closed_form.salient_idx, ll.closed_form.salient_idx):
                ll.r2 = leader.r2
                break
        else:
            leaders[id(seen[sub])].append(ll)


@torch.no_grad()
def linear_input_rms(module: torch.nn.Module, calib_ids: torch.Tensor, batch_size: int = 1,
                     include: Callable[[str], bool] | None = None,
                     forward: Callable[[torch.Tensor], object] | None = None
                     ) -> dict[str, torch.Tensor]:
    """Per-input-channel RMS of every Linear's input over `calib_ids` (forward hooks), keyed by
    module path in `module`. `forward(ids)` runs the model (default `module(ids)`); pass e.g. the
    backbone alone to skip an output head whose input statistics are not needed."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    handles = []
    for name, m in module.named_modules():
        if isinstance(m, torch.nn.Linear) and (include is None or include(name)):
            def hook(mod, args, name=name):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
                sums[name] = sums.get(name, 0) + x.square().sum(0)
                counts[name] = counts.get(name, 0) + x.shape[0]
            handles.append(m.register_forward_pre_hook(hook))
    try:
        for s in range(0, calib_ids.shape[0], batch_size):
            (forward or module)(calib_ids[s:s + batch_size])
    finally:
        for h in handles:
            h.remove()
    return {k: (v / counts[k]).sqrt().float() for k, v in sums.items()}


class substituted_weights:
    """Context manager: Linear weights of `module` replaced by dequantized packed weights
    (keyed by module path), and other tensors by `tensors` (keyed by their names, e.g. the
    norm weights end-to-end tuning returns), restored on exit. For evaluating a quantized model
    in eager mode."""

    def __init__(self, module: torch.nn.Module, packed: dict[str, MixedLinearWeights],
                 tensors: dict[str, torch.Tensor] | None = None):
        self.module, self.packed, self.saved = module, packed, {}
        self.tensors = tensors or {}

    def _targets(self) -> dict[str, torch.Tensor]:
        mods = dict(self.module.named_modules())
        out = {f"{name}.weight": mods[name].weight for name in self.packed}
        params = dict(self.module.named_parameters())
        out.update({name: params[name] for name in self.tensors})
        return out

    def __enter__(self):
        targets = self._targets()
        with torch.no_grad():
            for name, pk in self.packed.items():
                w = targets[f"{name}.weight"]
                self.saved[f"{name}.weight"] = w.detach().clone()
                w.copy_(pk.dequantize().to(w.dtype))
            for name, value in self.tensors.items():
                self.saved[name] = targets[name].detach().clone()
                targets[name].copy_(value)
        return self.module

    def __exit__(self, *exc):
        targets = self._targets()
        with torch.no_grad():
            for name, w in self.saved.items():
                targets[name].copy_(w)
        self.saved = {}
        return False
