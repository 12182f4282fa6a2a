"""Standard-op schemes on one model: perplexity (or, for an encoder, the pooled-embedding
cosine) of W8A8 and W6A6 without and with OS+ (the OS+ paper's ablation), and w4a16 as the
qexport op against ONNX Runtime's MatMulNBits, in one run.

Not a test. Each configuration is one `qexport` run (pipeline.run, the CLI's defaults except
the budget below) into WORK/<name>, kept for benchmarks/bench_model.py's latency table;
prints a markdown table:

    python benchmarks/standard_ops.py smollm2-135m --work /tmp/std
    python benchmarks/standard_ops.py path/to/all-MiniLM-L6-v2 --work /tmp/std-minilm --only w8a8 w6a6

Budget: --calib-samples (default 16) × 512 calibration tokens of Brown; perplexity on
--eval-tokens (default 8192) held-out Brown tokens in 512-token windows (fp, PyTorch quantized
and ONNX Runtime, the report's); no KV-cache decoder.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import time

CONFIGS = {  # name -> (scheme, OS+, target)
    "w8a8": ("w8a8", False, "ort"),
    "w8a8+os": ("w8a8", True, "ort"),
    "w6a6": ("w6a6", False, "ort"),
    "w6a6+os": ("w6a6", True, "ort"),
    "w4a16-qexport": ("w4a16", False, "ort"),
    "w4a16-nbits": ("w4a16", False, "ort-std"),
}


def run_one(model: str, name: str, work: pathlib.Path, args) -> dict:
    from qexport import pipeline
    from qexport.config import QuantizeConfig, RunConfig
    from qexport.schemes import parse_scheme

    scheme, os_plus, target = CONFIGS[name]
    config = RunConfig(model, str(work / name), target=target, kv_cache=False, force=True,
                       calib_samples=args.calib_samples, eval_tokens=args.eval_tokens,
                       threads=args.threads,
                       quantize=QuantizeConfig(parse_scheme(scheme),
                                               outlier_suppression=os_plus))
    t0 = time.perf_counter()
    r = pipeline.run(config, progress=lambda m: None).report
    e2e, ppl = r["end_to_end"], r.get("perplexity") or {}
    pooled = e2e.get("pooled_embedding") or {}
    return {"name": name, "scheme": scheme, "os": os_plus, "target": target,
            "bits": r["bits"]["bits_per_weight"], "mib": r["size"]["onnx_bytes"] / 2 ** 20,
            "library": r["op_library"], "parity": e2e["parity"]["cosine"],
            "ort_vs_fp": e2e["ort_vs_fp"]["cosine"], "ppl_fp": ppl.get("fp"),
            "ppl_torch": ppl.get("quantized_torch"), "ppl_ort": ppl.get("quantized_ort"),
            "pooled": pooled.get("ort_vs_fp_min_cosine"), "seconds": time.perf_counter() - t0,
            "one_token_ms": r["speed"]["one_token"]["ort_ms"] if r.get("speed") else None}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--work", type=pathlib.Path, required=True)
    p.add_argument("--only", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    rows = []
    for name in args.only:
        rows.append(run_one(args.model, name, args.work, args))
        print(json.dumps(rows[-1]), flush=True)

    def f(x, d=2):
        return "–" if x is None else f"{x:.{d}f}"
    print("\n| config | OS+ | target | bits/weight | files MiB | op library | parity cosine | "
          "ORT vs fp cosine | pooled emb. cosine (min) | ppl fp | ppl ORT | 1 token ms | s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['scheme']} | {'on' if r['os'] else 'off'} | {r['target']} | "
              f"{r['bits']:.3f} | {r['mib']:.1f} | {'yes' if r['library'] else 'no'} | "
              f"{r['parity']:.6f} | {r['ort_vs_fp']:.4f} | {f(r['pooled'], 4)} | "
              f"{f(r['ppl_fp'])} | {f(r['ppl_ort'])} | {f(r['one_token_ms'])} | "
              f"{r['seconds']:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
