"""PTQ1.61 on SmolLM2-135M: fp vs closed-form w1.61 vs learned w1.61 (held-out Brown perplexity).

Protocol (docs/results.md): calibration = the first n_samples x 512 tokens of
`brown_splits()[0]`; salient channels = the top 20% input channels of each Linear in the
transformer blocks by calibration activation RMS (the same set for both w1.61 rows); evaluation =
the first `--eval-tokens` tokens of `brown_splits()[1]` in 512-token windows; fp32, CPU.
The output head and embeddings stay fp (as the default skip pattern of qexport.api).

Baseline rows (not run by default; `qexport.baselines`, same Linears, same calibration tokens,
bits = every stored byte of each method's documented layout):
    w1       per-row binarization α·sign(W − μ) + μ (our format with no salient channel)
    rtn2     asymmetric RTN, 2 bits, groups of 64
    pbllm    PB-LLM (GPTQ-PB), 5% unstructured salient weights at 4 bits (≤ 2.1 real bits)
    pbllm10  PB-LLM, the paper's setting: 10% salient at 8 bits (~2.8 real bits)
    billm    BiLLM: residual-binarized salient columns + break-point split, OBC (~2.5 real bits)
OS+ rows (`qexport.api.quantize` with `outlier_suppression=True`: the searched OS+ folded into
the graph first, salient channels re-selected on the scaled activations, then as `closed` /
`learned`; the quantized graph is evaluated):
    closed_os, learned_os
The Hessian rows (pbllm, pbllm10, billm) share one pass of H = 2·XᵀX/n over the calibration
tokens on the fp model (`gptq.linear_input_hessians`); its time is in each of their times.

    python benchmarks/ptq161_smollm2.py                       # default preset, 64x512, 20k eval
    python benchmarks/ptq161_smollm2.py --preset fast --eval-tokens 4096
    python benchmarks/ptq161_smollm2.py --rows fp,w1,rtn2,pbllm,pbllm10,billm --threads 1
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time

import torch

from qexport.api import QuantizeConfig, quantize
from qexport.baselines import BASELINES, NEEDS_HESSIAN
from qexport.gptq import linear_input_hessians
from qexport.data import brown_splits, calibration_batches, eval_tokens
from qexport.evaluate import perplexity, torch_logits_fn
from qexport.models import load_model
from qexport.config import PRESETS, E2EConfig
from qexport.e2e import tune_end_to_end
from qexport.config import LoRAConfig
from qexport.preprocess import RestorativeLoRA
from qexport.families import find_blocks
from qexport.ptq161 import (LearnConfig, learn_mixed_weights, linear_input_rms,
                            substituted_weights)
from qexport.quantizers import quantize_mixed, select_salient
from qexport.schemes import parse_scheme


OURS = ("fp", "closed", "learned", "learned_e2e", "closed_os", "learned_os")


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="default", choices=list(PRESETS))
    ap.add_argument("--n-samples", type=int, default=None,
                    help="calibration sequences (default: 64, or the preset's n_samples)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None, help="one lr for α, r1, r2")
    ap.add_argument("--share-r2", action=argparse.BooleanOptionalAction, default=None,
                    help="one r2 per input activation [default: the preset's: on for default "
                         "and fast since session 14, off for best]")
    ap.add_argument("--mse-norm", default=None, choices=["mean", "token"],
                    help="LearnConfig.mse_norm [default: the preset's]")
    ap.add_argument("--eval-tokens", type=int, default=20_000)
    ap.add_argument("--short-eval", type=int, default=4096,
                    help="every row also reports the perplexity of the first SHORT_EVAL tokens")
    ap.add_argument("--full-eval-rows", default="fp,closed,learned",
                    help="rows evaluated on all --eval-tokens (the others: --short-eval only)")
    ap.add_argument("--salient-ratio", type=float, default=0.2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", default="fp,closed,learned",
                    help="comma-separated subset of " + ",".join(OURS + tuple(BASELINES)))
    ap.add_argument("--json", default=None, help="also write the results to this file")
    ap.add_argument("--work", default=None,
                    help="keep the PTQ1.61 learning's checkpoint (qexport.checkpoint) in this "
                         "folder: a rerun with the same settings reuses its finished blocks")
    ap.add_argument("--lora", action="store_true",
                    help="restorative LoRA (qexport.preprocess) before everything but fp")
    ap.add_argument("--lora-epochs", type=int, default=1)
    ap.add_argument("--lora-samples", type=int, default=None)
    ap.add_argument("--lora-rank", type=int, default=None)
    ap.add_argument("--lora-lr", type=float, default=None)
    ap.add_argument("--e2e-epochs", type=int, default=1, help="learned_e2e: E2EConfig.epochs")
    ap.add_argument("--e2e-lr", type=float, default=None, help="learned_e2e: E2EConfig.lr_scale")
    ap.add_argument("--e2e-norms", action=argparse.BooleanOptionalAction, default=True,
                    help="learned_e2e: E2EConfig.train_norms")
    ap.add_argument("--e2e-samples", type=int, default=None,
                    help="learned_e2e: sequences to tune on [default: the calibration rows]; "
                         "more than --n-samples draws the further ones from the same "
                         "calibration text (the first --n-samples are the calibration rows)")
    args = ap.parse_args(argv)
    if args.short_eval % 512 or args.short_eval > args.eval_tokens:
        ap.error("--short-eval must be a multiple of 512 and at most --eval-tokens")
    rows = set(args.rows.split(","))
    unknown = rows - {*OURS, *BASELINES}
    if unknown:
        ap.error(f"unknown rows: {sorted(unknown)}")
    return args, rows


class Bench:
    """The model, its calibration and evaluation tokens, and the results table."""

    def __init__(self, args):
        self.args = args
        overrides = {}
        if args.epochs is not None:
            overrides["epochs"] = args.epochs
        if args.lr is not None:
            overrides.update(lr_alpha=args.lr, lr_r1=args.lr, lr_r2=args.lr)
        if args.share_r2 is not None:
            overrides["share_r2"] = args.share_r2
        if args.mse_norm:
            overrides["mse_norm"] = args.mse_norm
        config = LearnConfig.preset(args.preset, **overrides)
        n_samples = args.n_samples or config.n_samples or 64
        self.config = LearnConfig.preset(args.preset, **{**overrides, "n_samples": n_samples})
        loaded = load_model("smollm2-135m")
        self.module = self.fp_module = loaded.module
        calib_text, eval_text = brown_splits()
        self.calib = calibration_batches(loaded.tokenizer, calib_text, n_samples, args.seq_len)
        self.e2e_ids = self.calib
        if args.e2e_samples and args.e2e_samples > n_samples:
            self.e2e_ids = calibration_batches(loaded.tokenizer, calib_text, args.e2e_samples,
                                               args.seq_len)
            assert torch.equal(self.e2e_ids[:n_samples], self.calib)
        self.tokens = eval_tokens(loaded.tokenizer, eval_text, args.eval_tokens)
        self.path, _ = find_blocks(self.module)
        backbone = loaded.hf_model.model  # the stats need no output head
        self.stats_forward = lambda ids: backbone(input_ids=ids, use_cache=False)
        self.lora_s = 0.0
        if args.lora:  # the rows below quantize the LoRA-merged copy; fp stays the original
            t0 = time.perf_counter()
            lora = LoRAConfig(epochs=args.lora_epochs, n_samples=args.lora_samples,
                              salient_ratio=args.salient_ratio,
                              **({"rank": args.lora_rank, "alpha": float(args.lora_rank)}
                                 if args.lora_rank else {}),
                              **({"lr": args.lora_lr} if args.lora_lr else {}))
            self.module = RestorativeLoRA(lora)(
                self.fp_module, [(self.calib[i:i + 1],) for i in range(self.calib.shape[0])], log)
            self.lora_s = time.perf_counter() - t0
            self.stats_forward = None
            log(f"restorative LoRA: {self.lora_s:.0f}s")
            self.lora_config = lora.as_dict()
        self.mods = dict(self.module.named_modules())
        self.full_rows = set(args.full_eval_rows.split(","))
        self.results = {"model": "smollm2-135m", "calib": list(self.calib.shape),
                        "e2e_calib": list(self.e2e_ids.shape),
                        "eval_tokens": args.eval_tokens, "threads": args.threads,
                        "config": self.config.as_dict(), "rows": {},
                        "lora": getattr(self, "lora_config", None), "lora_s": self.lora_s}

    def in_blocks(self, name: str) -> bool:
        return name.startswith(self.path + ".")

    def ppl(self, row, model=None):
        """{"ppl_short": on the first --short-eval tokens, "ppl": on all (full rows only)}."""
        args, tokens = self.args, self.tokens
        t0 = time.perf_counter()
        fn = torch_logits_fn(model if model is not None else self.module)
        short = perplexity(fn, tokens[:args.short_eval], window=512)
        out = {"ppl_short": short, "short_eval_tokens": args.short_eval}
        rest = tokens[args.short_eval:]
        if row in self.full_rows and rest.numel() >= 512:
            # windows never cross the split (short_eval is a multiple of 512), so the NLLs add up
            n1, n2 = args.short_eval // 512 * 511, rest.numel() // 512 * 511
            v = perplexity(fn, rest, window=512)
            out["ppl"] = math.exp((n1 * math.log(short) + n2 * math.log(v)) / (n1 + n2))
        log(f"{row}: perplexity {out} ({time.perf_counter() - t0:.0f}s)")
        return out

    def add(self, row, packed, t, model=None, tensors=None, **extra):
        """A result row: bits of `packed` substituted with `tensors` (or `model` evaluated as
        it is)."""
        bits = 8 * sum(p.weight_nbytes() for p in packed.values()) / sum(
            p.in_features * p.out_features for p in packed.values())
        if model is not None:
            self.results["rows"][row] = {"bits": bits, **self.ppl(row, model), "time_s": t,
                                         **extra}
            return
        with substituted_weights(self.module, packed, tensors):
            self.results["rows"][row] = {"bits": bits, **self.ppl(row), "time_s": t, **extra}


def our_rows(b: Bench, rows: set) -> None:
    """fp, closed (closed-form w1.61) and learned (PTQ1.61) on the same salient channels."""
    if "fp" in rows:
        b.results["rows"]["fp"] = {"bits": 32.0, **b.ppl("fp", b.fp_module), "time_s": 0.0}
    if not rows & {"closed", "learned", "learned_e2e"}:
        return
    t0 = time.perf_counter()
    rms = linear_input_rms(b.module, b.calib, include=b.in_blocks, forward=b.stats_forward)
    t_stats = time.perf_counter() - t0
    salient = {k: select_salient(v, b.args.salient_ratio) for k, v in rms.items()}
    log(f"activation RMS of {len(rms)} Linears: {t_stats:.0f}s")
    if "closed" in rows:
        t0 = time.perf_counter()
        closed = {k: quantize_mixed(b.mods[k].weight, b.mods[k].bias, s, 0)
                  for k, s in salient.items()}
        b.add("closed", closed, t_stats + time.perf_counter() - t0)
    if rows & {"learned", "learned_e2e"}:
        t0 = time.perf_counter()
        learned = learn_mixed_weights(b.module, b.calib, salient, 0, b.config, progress=log,
                                      checkpoint_dir=b.args.work)
        t = t_stats + time.perf_counter() - t0
        log(f"learning: {t - t_stats:.0f}s")
        if "learned" in rows:
            b.add("learned", learned, t)
        if "learned_e2e" in rows:
            e2e = E2EConfig(epochs=b.args.e2e_epochs, n_samples=b.args.e2e_samples,
                            train_norms=b.args.e2e_norms,
                            **({"lr_scale": b.args.e2e_lr} if b.args.e2e_lr else {}))
            t1 = time.perf_counter()
            tuned = tune_end_to_end(b.module, learned, b.e2e_ids, e2e, progress=log,
                                    teacher=b.fp_module)
            t_e2e = time.perf_counter() - t1
            log(f"end-to-end tuning: {t_e2e:.0f}s")
            b.add("learned_e2e", tuned.packed, t + t_e2e, tensors=tuned.tensors,
                  e2e=e2e.as_dict(), e2e_s=t_e2e)


def os_rows(b: Bench, rows: set) -> None:
    """closed_os, learned_os: qexport.api.quantize with OS+ folded first."""
    for row in ("closed_os", "learned_os"):
        if row not in rows:
            continue
        t0 = time.perf_counter()
        qcfg = QuantizeConfig(parse_scheme("w1.61a16").with_overrides(b.args.salient_ratio),
                              outlier_suppression=True, learn=b.config,
                              skip=rf"^(?!{re.escape(b.path)}\.)",  # the block Linears only
                              method="ptq161" if row == "learned_os" else "closed-form",
                              head_scheme=None, embeddings_fp16=False)  # as the other rows
        qm = quantize(b.module, (b.calib[:1, :8],), [(x.unsqueeze(0),) for x in b.calib], qcfg,
                      progress=log)
        t = time.perf_counter() - t0
        log(f"{row}: quantized in {t:.0f}s")
        b.add(row, qm.packed, t, model=qm.graph_module)
        del qm


def baseline_rows(b: Bench, rows: set) -> None:
    """The qexport.baselines rows; the Hessian ones share one pass of H."""
    names = [r for r in BASELINES if r in rows]
    hessians, t_hess = None, 0.0
    if NEEDS_HESSIAN & set(names):
        t0 = time.perf_counter()
        hessians = linear_input_hessians(b.module, b.calib, include=b.in_blocks,
                                         forward=b.stats_forward)
        t_hess = time.perf_counter() - t0
        log(f"Hessians of {len(hessians)} Linears: {t_hess:.0f}s")
    linears = [k for k, m in b.mods.items() if isinstance(m, torch.nn.Linear) and b.in_blocks(k)]
    for row in names:
        t0 = time.perf_counter()
        fq = {k: BASELINES[row](b.mods[k].weight, b.mods[k].bias,
                                hessians[k] if row in NEEDS_HESSIAN else None) for k in linears}
        t = time.perf_counter() - t0
        log(f"{row}: quantized in {t:.0f}s")
        extra = {"hessian_s": t_hess} if row in NEEDS_HESSIAN else {}
        b.add(row, fq, t + (t_hess if extra else 0.0), **extra)
        del fq


def main(argv=None) -> int:
    args, rows = parse_args(argv)
    torch.set_num_threads(args.threads)
    b = Bench(args)
    our_rows(b, rows)
    os_rows(b, rows)
    baseline_rows(b, rows)
    text = json.dumps(b.results, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
