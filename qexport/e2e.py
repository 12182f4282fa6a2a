"""End-to-end tuning of a w1.61 model's continuous parameters against the fp model.

After PTQ1.61's block-wise learning every Linear of the blocks is a packed
`MixedLinearWeights`: signs, 4-bit codes and salient channels (discrete, frozen here) and the
continuous tensors the op multiplies them by. This stage trains those continuous tensors of
every layer at once, with a KL loss between the quantized model's next-token distribution and
the fp model's over the calibration text (EfficientQAT's E2E-QP, applied to the PTQ1.61 format):

    binary part   W[:, b] = (row_scale·a ⊙ sign + row_offset + row_scale·o) ⊙ (r2·c)
    salient part  W[:, s] = (code − zero) ⊙ salient_scale·d
    bias          bias + e
    norm weight   γ ⊙ n      (every normalization layer's weight, E2EConfig.train_norms)

with a, c, d, n multiplicative (start at 1: the learning rate is a relative step for tensors whose
magnitudes differ by orders) and o, e additive (start at 0). The result is packed in the same
format, rounded to what is stored (fp16 scales, fp32 bias), so what is exported is exactly what
was trained and parity with the PyTorch reference stays exact; the norm weights come back as
tensors of the model's dtype, which the pipeline puts into the graph in place of the originals
(as it does with OS+-folded ones).

Memory: the fp model, the quantized weights in fp32 during the step (one copy of the model),
the constant signs and codes as fp32 (another), and one sequence's activations for the
backward pass. The teacher's logits are computed per step (not stored: 64 × 512 tokens × a
49k vocabulary would be 6.4 GB).
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch.func import functional_call

from . import checkpoint
from .config import E2EConfig
from .errors import QexportError
from .ops.binary_mixed_linear.packing import (MixedLinearWeights, binary_channels,
                                              unpack_nibbles, unpack_signs)


class _Tunable(torch.nn.Module):
    """One packed Linear with trainable continuous parameters (see the module docstring)."""

    def __init__(self, w: MixedLinearWeights, train_r2: bool):
        super().__init__()
        self.w = w
        n, k, s = w.out_features, w.in_features, w.num_salient
        self.register_buffer("bidx", binary_channels(k, w.salient_idx))
        self.register_buffer("sidx", w.salient_idx.long())
        kb = w.num_binary
        self.register_buffer("signs", unpack_signs(w.sign_packed, kb) if kb else
                             torch.zeros(n, 0))
        self.register_buffer("rs0", w.row_scale.float())
        self.register_buffer("ro0", w.row_offset.float())
        self.register_buffer("r20", w.r2.float() if w.r2 is not None else torch.ones(kb))
        self.a = torch.nn.Parameter(torch.ones(n))
        self.o = torch.nn.Parameter(torch.zeros(n))
        self.c = torch.nn.Parameter(torch.ones(kb), requires_grad=train_r2 and w.r2 is not None)
        if s:
            gs = w.salient_group_size if w.salient_group_size > 0 else s
            group_of = torch.arange(s) // gs
            self.register_buffer("codes", unpack_nibbles(w.salient_packed, s).float() -
                                 w.salient_zero.float()[:, group_of])
            self.register_buffer("group_of", group_of)
            self.register_buffer("ss0", w.salient_scale.float())
            self.d = torch.nn.Parameter(torch.ones_like(self.ss0))
        self.e = torch.nn.Parameter(torch.zeros(n), requires_grad=w.bias is not None)

    def weight(self) -> torch.Tensor:
        w = self.w
        out = self.rs0.new_zeros(w.out_features, w.in_features)
        if w.num_binary:
            rs = (self.rs0 * self.a)[:, None]
            wb = (rs * self.signs + (self.ro0 + self.rs0 * self.o)[:, None]) * \
                (self.r20 * self.c)[None, :]
            out = out.index_copy(1, self.bidx, wb)
        if w.num_salient:
            scale = (self.ss0 * self.d)[:, self.group_of]
            out = out.index_copy(1, self.sidx, self.codes * scale)
        return out

    def bias(self) -> torch.Tensor | None:
        return None if self.w.bias is None else self.w.bias + self.e

    def pack(self) -> MixedLinearWeights:
        """The trained layer in the stored format (fp16 scales: what the op executes)."""
        w = self.w
        with torch.no_grad():
            rs = (self.rs0 * self.a).half()
            ro = (self.ro0 + self.rs0 * self.o).half()
            r2 = None if w.r2 is None else (self.r20 * self.c).half()
            ss = (self.ss0 * self.d).half() if w.num_salient else w.salient_scale
            bias = None if w.bias is None else (w.bias + self.e).float()
        packed = dataclasses.replace(w, row_scale=rs, row_offset=ro, r2=r2, salient_scale=ss,
                                     bias=bias)
        packed.validate()
        return packed


def _tie_shared_r2(tunable: dict[str, _Tunable]) -> None:
    """One r2 factor for the Linears that share their r2 (LearnConfig.share_r2: q/k/v and
    gate/up read one activation with the same salient channels), so that they still stack
    into one op after tuning (MixedLinearWeights.stacks_with, passes.fuse_shared_input)."""
    firsts: list[_Tunable] = []
    for t in tunable.values():
        if t.w.r2 is None:
            continue
        first = next((f for f in firsts if f.w.stacks_with(t.w)), None)
        if first is None:
            firsts.append(t)
        else:
            t.c = first.c


class NotLogits(QexportError):
    """The model's output has no logits to distil (e.g. an encoder's hidden states object)."""


def _logits(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        return out[0]
    raise NotLogits(f"the model returned {type(out).__name__}, not logits")


def teacher_logprobs(teacher: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The fp model's next-token log-probabilities on ids x (no grad)."""
    with torch.no_grad():
        return F.log_softmax(_logits(teacher(x)).float(), dim=-1)


def kl_to_teacher(module: torch.nn.Module, params: dict, x: torch.Tensor,
                  target: torch.Tensor) -> torch.Tensor:
    """KL(teacher || module with `params` substituted) per token on ids x: the distillation
    loss of end-to-end tuning and of restorative LoRA."""
    student = F.log_softmax(_logits(functional_call(module, params, (x,))).float(), dim=-1)
    return F.kl_div(student.flatten(0, -2), target.flatten(0, -2), log_target=True,
                    reduction="batchmean")


def _fingerprint(module, packed, ids, norms, config: E2EConfig) -> str:
    """What the tuning's result depends on (qexport.checkpoint.fingerprint): the model, the
    packed weights it starts from, the ids, the norm weights and the settings that change
    the steps (not how often it logs or saves)."""
    tensors = {f"{name}.{i}": t for name, w in packed.items()
               for i, t in enumerate(w.tensors()) if t is not None}
    tensors.update({f"norm:{name}": t for name, t in norms.items()})
    settings = {k: v for k, v in config.as_dict().items()
                if k not in ("log_every", "checkpoint_every")}
    return checkpoint.fingerprint(module, ids, tensors, {"stage": "e2e", **settings})


def cosine_schedule(opt: torch.optim.Optimizer, steps: int):
    """Learning rates decayed from their value to 0 over `steps` optimizer steps."""
    steps = max(1, steps)
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps)))


@dataclasses.dataclass
class E2EResult:
    packed: dict[str, MixedLinearWeights]  # layer name -> tuned packed weights
    tensors: dict[str, torch.Tensor]  # tensor name in the model -> tuned value (norm weights)


def norm_weights(module: torch.nn.Module) -> list[str]:
    """Names of the weights (γ) of the normalization layers of `module` (LayerNorm, RMSNorm and
    the families' own *Norm classes): 1-D parameters of modules whose class name has "Norm"."""
    return [f"{name}.weight" for name, m in module.named_modules()
            if "Norm" in type(m).__name__ and isinstance(getattr(m, "weight", None),
                                                        torch.nn.Parameter)
            and m.weight.dim() == 1]


def tune_end_to_end(module: torch.nn.Module, packed: dict[str, MixedLinearWeights],
                    calib_ids: torch.Tensor, config: E2EConfig | None = None,
                    progress: Callable[[str], None] | None = None,
                    teacher: torch.nn.Module | None = None,
                    checkpoint_dir: str | os.PathLike | None = None) -> E2EResult:
    """Train the continuous parameters of `packed` (layer name -> weights; names are module
    paths in `module`, which maps input_ids [B, L] to logits) and, with config.train_norms,
    the weights of `module`'s normalization layers, against the fp model `teacher` (default:
    `module` itself with its fp weights; the original model when `module` was preprocessed) by
    KL on the next-token distributions over `calib_ids` [n, L]. Returns new packed weights
    (same signs, codes, salient channels) and the tuned norm weights. Neither model is
    modified. `checkpoint_dir`: a work folder where the tuning saves its progress every
    config.checkpoint_every steps and resumes from (qexport.checkpoint.E2ECheckpoint)."""
    teacher = module if teacher is None else teacher
    config = config or E2EConfig()
    say = progress or (lambda msg: None)
    if config.n_samples is not None and config.n_samples < 1:
        raise QexportError(f"end-to-end tuning needs n_samples >= 1 (or None), got "
                           f"{config.n_samples}")
    ids = calib_ids[:config.n_samples] if config.n_samples else calib_ids
    if ids.dim() != 2 or ids.shape[0] < 1:
        raise QexportError(f"end-to-end tuning needs ids of shape [n, L], got {tuple(ids.shape)}")
    if config.n_samples and ids.shape[0] < config.n_samples:  # the steps asked for, repeated
        say(f"end-to-end tuning: {ids.shape[0]} sequences for {config.n_samples} per epoch: "
            "they repeat")
        ids = ids.repeat(-(-config.n_samples // ids.shape[0]), 1)[:config.n_samples]
    mods = dict(module.named_modules())
    missing = [n for n in packed if not isinstance(mods.get(n), torch.nn.Linear)]
    if missing:
        raise QexportError(f"end-to-end tuning: {missing[0]} is not a Linear of the model")
    tunable = {n: _Tunable(w, config.train_r2) for n, w in packed.items()}
    _tie_shared_r2(tunable)
    norms = {}
    if config.train_norms:
        params = dict(module.named_parameters())
        norms = {name: params[name].detach() for name in norm_weights(module) if name in params}
    norm_factors = {name: torch.nn.Parameter(torch.ones_like(w, dtype=torch.float32))
                    for name, w in norms.items()}
    groups = {"a": [], "o": [], "c": [], "d": [], "e": [], "n": list(norm_factors.values())}
    seen = set()  # a tied r2 factor once
    for t in tunable.values():
        for name in "acdeo":
            p = getattr(t, name, None)
            if p is not None and p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                groups[name].append(p)
    lrs = {"a": config.lr_scale, "o": config.lr_scale, "c": config.lr_scale,
           "d": config.lr_scale, "e": config.lr_bias, "n": config.lr_scale}
    opt = torch.optim.AdamW([{"params": ps, "lr": lrs[k]} for k, ps in groups.items() if ps],
                            weight_decay=0.0)

    def norm_value(name: str) -> torch.Tensor:
        w = norms[name]
        return (w.float() * norm_factors[name]).to(w.dtype)

    requires = {p: p.requires_grad for m in (module, teacher) for p in m.parameters()}
    for p in requires:
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(config.seed)
    n, bs = ids.shape[0], max(1, config.batch_size)
    batches = [(s, min(s + bs, n)) for s in range(0, n, bs)]
    steps = config.epochs * len(batches)
    sched = cosine_schedule(opt, steps)
    trained = [p for ps in groups.values() for p in ps]  # in the optimizer's order
    ckpt = None if checkpoint_dir is None else checkpoint.E2ECheckpoint(
        checkpoint_dir, _fingerprint(module, packed, ids, norms, config))
    state = ckpt.load(say) if ckpt else None
    step, start_epoch, order, position, total = 0, 0, None, 0, 0.0
    first = last = float("nan")
    if state is not None:
        with torch.no_grad():
            for p, v in zip(trained, state["params"]):
                p.copy_(v)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["schedule"])
        gen.set_state(state["generator"])
        step, start_epoch, order = state["step"], state["epoch"], state["order"]
        position, total, first = state["position"], state["total"], state["first"]
        say(f"end-to-end tuning: resuming at step {step}/{steps} from {checkpoint_dir}")
    t_start, step0 = time.perf_counter(), step
    say(f"end-to-end tuning: {len(tunable)} packed Linears"
        f"{f' and {len(norms)} norm weights' if norms else ''}, {steps} steps")
    try:
        for epoch in range(start_epoch, config.epochs):
            if order is None:  # a new epoch (a resumed one keeps its saved order)
                order = torch.randperm(len(batches), generator=gen).tolist()
                position, total = 0, 0.0
            for position in range(position, len(order)):
                s, e = batches[order[position]]
                x = ids[s:e]
                target = teacher_logprobs(teacher, x)
                params = {name: norm_value(name) for name in norms}
                for name, t in tunable.items():
                    params[f"{name}.weight"] = t.weight()
                    b = t.bias()
                    if b is not None:
                        params[f"{name}.bias"] = b
                loss = kl_to_teacher(module, params, x, target)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                value = float(loss.detach())
                total += value * (e - s)
                if first != first:
                    first = value
                if step % max(1, config.log_every) == 0 or step == steps:
                    rate = (time.perf_counter() - t_start) / (step - step0)
                    say(f"end-to-end tuning: step {step}/{steps}, KL {value:.4g}, "
                        f"{rate:.1f}s/step, ETA {rate * (steps - step):.0f}s")
                if ckpt and step < steps and step % max(1, config.checkpoint_every) == 0:
                    ckpt.save({"step": step, "steps": steps, "epoch": epoch, "order": order,
                               "position": position + 1, "total": total, "first": first,
                               "params": [p.detach().clone() for p in trained],
                               "optimizer": opt.state_dict(), "schedule": sched.state_dict(),
                               "generator": gen.get_state()})
            order = None
            last = total / n
            say(f"end-to-end tuning: epoch {epoch + 1}/{config.epochs}, KL {first:.4g} (first "
                f"step) -> {last:.4g} (epoch mean)")
    finally:
        for p, r in requires.items():
            p.requires_grad_(r)
    with torch.no_grad():
        tensors = {name: norm_value(name).detach().clone() for name in norms}
    return E2EResult({name: t.pack() for name, t in tunable.items()}, tensors)
