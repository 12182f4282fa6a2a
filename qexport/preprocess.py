"""Quantization preprocessing (PTQ1.61's restorative LoRA): make the fp model easier to binarize.

As in the paper (its "quantization preprocessing"), before the PTQ pass:
1. every Linear of the transformer blocks is fake-quantized to w1.61 in closed form (salient
   channels by calibration activation RMS, 4-bit round-to-nearest per row; the others
   binarized, α = mean|W − μ|), with a straight-through estimator;
2. LoRA adapters W + (α_lora/r)·B·A on those Linears are trained so that this fake-quantized
   model's next-token distributions match the fp model's (KL) over the calibration text;
3. the adapters are merged into the fp weights: the result is an fp model (itself somewhat
   worse than the original) whose weights binarize better. PTQ1.61 then runs on it as usual.

`RestorativeLoRA(config)` is a `QuantizeConfig.preprocess` callable: (module, calibration
batches, progress) -> a new module (a deep copy: the original stays the reference the quantized model is
compared with, and the end-to-end tuning's teacher).

Memory: a second copy of the model (the merged one), the LoRA parameters and their AdamW state
(2·r·(N + K) per Linear, ~4 % of SmolLM2 at r = 64), one sequence's activations for the
backward pass, and the fake-quantized weights of the step (one more copy of the block
Linears). A 7B model in fp32 would need ~3 × 28 GB plus activations: a bigger machine, bf16
weights, or per-block training against block outputs (not built).
"""
from __future__ import annotations

import copy
import math
import time
from typing import Callable

import torch

from .config import LoRAConfig
from .e2e import cosine_schedule, kl_to_teacher, teacher_logprobs
from .errors import QexportError
from .families import find_blocks
from .quantizers import select_salient


def fake_quantize_w161(w: torch.Tensor, salient: torch.Tensor) -> torch.Tensor:
    """Closed-form w1.61 of w [N, K] (salient columns: 4-bit RTN per row; others binarized
    around the row mean), as the dequantized fp32 weight; the gradient passes straight through."""
    q = w.detach().clone()
    is_sal = torch.zeros(w.shape[1], dtype=torch.bool)
    is_sal[salient.long()] = True
    wb = q[:, ~is_sal]
    if wb.shape[1]:
        mu = wb.mean(1, keepdim=True)
        alpha = (wb - mu).abs().mean(1, keepdim=True)
        q[:, ~is_sal] = torch.where(wb >= mu, mu + alpha, mu - alpha)
    if is_sal.any():
        ws = q[:, is_sal]
        lo, hi = ws.min(1, keepdim=True).values, ws.max(1, keepdim=True).values
        scale = ((hi - lo) / 15).clamp(min=1e-8)
        zero = (-lo / scale).round().clamp(0, 15)
        q[:, is_sal] = ((ws / scale + zero).round().clamp(0, 15) - zero) * scale
    return w + (q - w).detach()


class RestorativeLoRA:
    """A QuantizeConfig.preprocess: (module, calib_batches, progress) -> the merged copy."""
    __name__ = "restorative_lora"

    def __init__(self, config: LoRAConfig | None = None):
        self.config = config or LoRAConfig()
        self.timings: dict[str, float] = {}

    def __call__(self, module: torch.nn.Module, batches: list,
                 progress: Callable[[str], None] | None = None) -> torch.nn.Module:
        from .ptq161 import linear_input_rms

        c, say = self.config, progress or (lambda msg: None)
        ids = torch.cat([b[0] for b in batches])
        ids = ids[:c.n_samples] if c.n_samples else ids
        if ids.dim() != 2 or ids.shape[0] < 1:
            raise QexportError(f"restorative LoRA needs calibration ids [n, L], got "
                               f"{tuple(ids.shape)}")
        path, blocks = find_blocks(module)
        names = [f"{path}.{bi}.{sub}" for bi, b in enumerate(blocks)
                 for sub, m in b.named_modules() if isinstance(m, torch.nn.Linear)]
        mods = dict(module.named_modules())
        t0 = time.perf_counter()
        with torch.no_grad():
            rms = linear_input_rms(module, ids, include=set(names).__contains__)
        salient = {n: select_salient(rms[n], c.salient_ratio) for n in names}
        g = torch.Generator().manual_seed(c.seed)
        adapters = {}
        for n in names:
            out_f, in_f = mods[n].weight.shape
            a = torch.empty(c.rank, in_f)
            torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=g)
            adapters[n] = (torch.nn.Parameter(a), torch.nn.Parameter(torch.zeros(out_f, c.rank)))
        scale = c.alpha / c.rank
        opt = torch.optim.AdamW([p for ab in adapters.values() for p in ab], lr=c.lr,
                                weight_decay=0.0)
        steps = c.epochs * ids.shape[0]
        sched = cosine_schedule(opt, steps)
        requires = {p: p.requires_grad for p in module.parameters()}
        for p in requires:
            p.requires_grad_(False)
        step, t_learn = 0, time.perf_counter()
        try:
            for epoch in range(c.epochs):
                total, first = 0.0, float("nan")
                for j in torch.randperm(ids.shape[0], generator=g).tolist():
                    x = ids[j:j + 1]
                    target = teacher_logprobs(module, x)
                    params = {f"{n}.weight": fake_quantize_w161(
                        mods[n].weight + scale * (b @ a), salient[n])
                        for n, (a, b) in adapters.items()}
                    loss = kl_to_teacher(module, params, x, target)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    step += 1
                    v = float(loss.detach())
                    total += v
                    first = v if first != first else first
                    if step % max(1, c.log_every) == 0 or step == steps:
                        done = time.perf_counter() - t_learn
                        say(f"restorative LoRA: step {step}/{steps}, KL {v:.4g}, "
                            f"{done / step:.1f}s/step, ETA {done / step * (steps - step):.0f}s")
                say(f"restorative LoRA: epoch {epoch + 1}/{c.epochs}, KL {first:.4g} (first "
                    f"step) -> {total / ids.shape[0]:.4g} (epoch mean)")
        finally:
            for p, r in requires.items():
                p.requires_grad_(r)
        merged = copy.deepcopy(module)
        merged_mods = dict(merged.named_modules())
        with torch.no_grad():
            for n, (a, b) in adapters.items():
                merged_mods[n].weight.add_(scale * (b @ a))
        self.timings["preprocess_lora"] = time.perf_counter() - t0
        return merged
