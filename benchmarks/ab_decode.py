"""Paired A/B of KV-cache decoders (by hand, not a test): one decoded token each, in place.

The models take turns in one process, round after round (20 runs each, the median kept); each
round's time of a model over the first model's in the same round is one paired ratio. On a
shared host whose speed moves by tens of percent from one minute to the next, the median of
those ratios (with their range) says more than two medians taken apart. Rows: median and
minimum of the round medians, then the paired ratios. Uses bench_model's session and runner.

    python benchmarks/ab_decode.py --threads 1 2 --rounds 40 \
        before=old/model_with_past.onnx after=new/model_with_past.onnx
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_linear  # noqa: E402
import bench_model  # noqa: E402


def rounds(models: dict[str, str], threads: int, n_rounds: int, runs: int = 20,
           cached: int = 128, buffer: int = 2048) -> dict[str, list[float]]:
    """label -> per-round median ms of one decoded token after `cached` tokens."""
    calls = {k: bench_model._runner(bench_model._session(p, threads), 1, cached, buffer)
             for k, p in models.items()}
    out = {k: [] for k in calls}
    for _ in range(n_rounds):
        for label, call in calls.items():
            time.sleep(0.05)  # the previous session's pool threads stop spinning
            call()
            times = []
            for _ in range(runs):
                t0 = time.perf_counter()
                call()
                times.append(time.perf_counter() - t0)
            out[label].append(statistics.median(times) * 1e3)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", metavar="LABEL=PATH",
                   help="model_with_past.onnx files; the first is the base of the ratios")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--cached", type=int, default=128)
    args = p.parse_args(argv)
    if any("=" not in m for m in args.models):
        p.error("models are LABEL=PATH")
    models = dict(m.split("=", 1) for m in args.models)
    print(f"# {bench_linear.cpu_description()}")
    print(f"# one token after {args.cached} cached, in place; {args.rounds} rounds of 20 runs, "
          "models taking turns; ratio: the row's round median over the first model's, paired")
    print(f"{'model':>12} thr | median ms   min ms | ratio median      range")
    for threads in args.threads:
        per = rounds(models, threads, args.rounds, cached=args.cached)
        base = per[next(iter(per))]
        for label, v in per.items():
            ratios = [a / b for a, b in zip(v, base)]
            print(f"{label:>12} {threads:>3} | {statistics.median(v):9.3f} {min(v):8.3f} | "
                  f"{statistics.median(ratios):12.3f} {min(ratios):.3f}-{max(ratios):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
