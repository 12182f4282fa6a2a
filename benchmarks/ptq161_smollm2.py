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
from qexport.ptq161 import (LearnConfig, find_blocks, learn_mixed_weights, linear_input_rms,
                            substituted_weights)
from qexport.quantizers import quantize_mixed, select_salient
from qexport.schemes import parse_scheme


OURS = ("fp", "closed", "learned", "closed_os", "learned_os")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="default", choices=["default", "fast"])
    ap.add_argument("--n-samples", type=int, default=None,
                    help="calibration sequences (default: 64, or the preset's n_samples)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None, help="one lr for α, r1, r2")
    ap.add_argument("--share-r2", action="store_true",
                    help="one r2 per input activation (default: one per Linear)")
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
    args = ap.parse_args(argv)
    if args.short_eval % 512 or args.short_eval > args.eval_tokens:
        ap.error("--short-eval must be a multiple of 512 and at most --eval-tokens")
    torch.set_num_threads(args.threads)
    rows = set(args.rows.split(","))
    unknown = rows - {*OURS, *BASELINES}
    if unknown:
        ap.error(f"unknown rows: {sorted(unknown)}")

    def log(msg):
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    overrides = {}
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    if args.lr is not None:
        overrides.update(lr_alpha=args.lr, lr_r1=args.lr, lr_r2=args.lr)
    if args.share_r2:
        overrides["share_r2"] = True
    config = LearnConfig.preset(args.preset, **overrides)
    n_samples = args.n_samples or config.n_samples or 64
    config = LearnConfig.preset(args.preset, **{**overrides, "n_samples": n_samples})

    loaded = load_model("smollm2-135m")
    module = loaded.module
    calib_text, eval_text = brown_splits()
    calib = calibration_batches(loaded.tokenizer, calib_text, n_samples, args.seq_len)
    tokens = eval_tokens(loaded.tokenizer, eval_text, args.eval_tokens)
    path, _ = find_blocks(module)
    in_blocks = lambda name: name.startswith(path + ".")  # noqa: E731
    results = {"model": "smollm2-135m", "calib": list(calib.shape), "eval_tokens": args.eval_tokens,
               "threads": args.threads, "config": config.as_dict(), "rows": {}}

    full_rows = set(args.full_eval_rows.split(","))

    def ppl(row, model=module):
        """{"ppl_short": on the first --short-eval tokens, "ppl": on all (full rows only)}."""
        t0 = time.perf_counter()
        fn = torch_logits_fn(model)
        short = perplexity(fn, tokens[:args.short_eval], window=512)
        out = {"ppl_short": short, "short_eval_tokens": args.short_eval}
        rest = tokens[args.short_eval:]
        if row in full_rows and rest.numel() >= 512:
            # windows never cross the split (short_eval is a multiple of 512), so the NLLs add up
            n1, n2 = args.short_eval // 512 * 511, rest.numel() // 512 * 511
            v = perplexity(fn, rest, window=512)
            out["ppl"] = math.exp((n1 * math.log(short) + n2 * math.log(v)) / (n1 + n2))
        log(f"{row}: perplexity {out} ({time.perf_counter() - t0:.0f}s)")
        return out

    if "fp" in rows:
        results["rows"]["fp"] = {"bits": 32.0, **ppl("fp"), "time_s": 0.0}

    backbone = loaded.hf_model.model  # the stats need no output head
    stats_forward = lambda ids: backbone(input_ids=ids, use_cache=False)  # noqa: E731
    mods = dict(module.named_modules())
    if rows & {"closed", "learned"}:
        t0 = time.perf_counter()
        rms = linear_input_rms(module, calib, include=in_blocks, forward=stats_forward)
        t_stats = time.perf_counter() - t0
        salient = {k: select_salient(v, args.salient_ratio) for k, v in rms.items()}
        log(f"activation RMS of {len(rms)} Linears: {t_stats:.0f}s")

    def bits(packed):
        return 8 * sum(p.weight_nbytes() for p in packed.values()) / sum(
            p.in_features * p.out_features for p in packed.values())

    if "closed" in rows:
        t0 = time.perf_counter()
        closed = {k: quantize_mixed(mods[k].weight, mods[k].bias, s, 0) for k, s in salient.items()}
        t = t_stats + time.perf_counter() - t0
        with substituted_weights(module, closed):
            results["rows"]["closed"] = {"bits": bits(closed), **ppl("closed"),
                                       "time_s": t}
        del closed

    if "learned" in rows:
        t0 = time.perf_counter()
        learned = learn_mixed_weights(module, calib, salient, 0, config, progress=log)
        t = t_stats + time.perf_counter() - t0
        log(f"learning: {t - t_stats:.0f}s")
        with substituted_weights(module, learned):
            results["rows"]["learned"] = {"bits": bits(learned), **ppl("learned"),
                                        "time_s": t}

    for row in ("closed_os", "learned_os"):
        if row not in rows:
            continue
        t0 = time.perf_counter()
        qcfg = QuantizeConfig(parse_scheme("w1.61a16").with_overrides(args.salient_ratio),
                              outlier_suppression=True, learn=config,
                              skip=rf"^(?!{re.escape(path)}\.)",  # the block Linears only
                              method="ptq161" if row == "learned_os" else "closed-form",
                              head_scheme=None, embeddings_fp16=False)  # as the other rows
        qm = quantize(module, (calib[:1, :8],), [(b.unsqueeze(0),) for b in calib], qcfg,
                      progress=log)
        t = time.perf_counter() - t0
        log(f"{row}: quantized in {t:.0f}s")
        results["rows"][row] = {"bits": bits(qm.packed), **ppl(row, qm.graph_module),
                                "time_s": t}
        del qm

    baseline_rows = [r for r in BASELINES if r in rows]
    hessians, t_hess = None, 0.0
    if NEEDS_HESSIAN & set(baseline_rows):
        t0 = time.perf_counter()
        hessians = linear_input_hessians(module, calib, include=in_blocks, forward=stats_forward)
        t_hess = time.perf_counter() - t0
        log(f"Hessians of {len(hessians)} Linears: {t_hess:.0f}s")
    linears = [k for k, m in mods.items() if isinstance(m, torch.nn.Linear) and in_blocks(k)]
    for row in baseline_rows:
        t0 = time.perf_counter()
        fq = {k: BASELINES[row](mods[k].weight, mods[k].bias,
                                hessians[k] if row in NEEDS_HESSIAN else None) for k in linears}
        t = time.perf_counter() - t0
        log(f"{row}: quantized in {t:.0f}s")
        extra = {"hessian_s": t_hess} if row in NEEDS_HESSIAN else {}
        t += t_hess if extra else 0.0
        with substituted_weights(module, fq):
            results["rows"][row] = {"bits": bits(fq), **ppl(row), "time_s": t, **extra}
        del fq

    text = json.dumps(results, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
