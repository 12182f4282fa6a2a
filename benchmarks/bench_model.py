"""End-to-end benchmark: SmolLM2-135M exported fp32 vs w1.61a16 (qexport ops) in ONNX Runtime.

Not a test. Per model and thread count, each measurement runs in a fresh subprocess (so that
peak RSS, from resource.getrusage ru_maxrss, belongs to that model alone):
- single-token forward latency (input_ids [1, 1]; no KV cache: the exports take the whole
  sequence), median over repeated runs;
- 128-token prefill latency (input_ids [1, 128]), median;
- peak RSS of the process (session creation + the runs);
plus the model file size.

Inputs:
    qexport smollm2-135m --scheme w1.61a16 -o OUT --no-perplexity        # w1.61a16 folder
    python benchmarks/bench_model.py --w161 OUT/model.onnx --fp32 fp32/model.onnx
The fp32 ONNX is written by this script when --fp32 names a missing file:
torch.onnx.export(dynamo=True) of qexport.models.load_model("smollm2-135m").module through
qexport.onnx_export's trace/export_onnx helpers, example batch 2, dynamic batch and sequence.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time


def export_fp32(path: pathlib.Path) -> None:
    import torch

    from qexport import models, onnx_export as export

    loaded = models.load_model("smollm2-135m")
    example = (torch.randint(0, 1000, (2, 16)),)
    gm = export.trace(loaded.module, example)
    path.parent.mkdir(parents=True, exist_ok=True)
    export.export_onnx(gm, example, path, metadata={}, input_names=["input_ids"],
                       output_names=["logits"])


def _child(model: str, threads: int, seq: int, reps: int) -> None:
    import resource

    import numpy as np
    import onnxruntime as ort

    from qexport import native

    so = native.session_options()  # the qexport ops registered (harmless for fp32)
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(model, sess_options=so, providers=["CPUExecutionProvider"])
    ids = np.random.default_rng(0).integers(0, 49152, (1, seq)).astype(np.int64)
    name = sess.get_inputs()[0].name
    for _ in range(2):
        sess.run(None, {name: ids})
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        sess.run(None, {name: ids})
        times.append(time.perf_counter() - t0)
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"median_s": statistics.median(times), "min_s": min(times),
                      "peak_rss_mib": rss_kib / 1024}))


def _measure(model: pathlib.Path, threads: int, seq: int, reps: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", str(model), "--threads",
                          str(threads), "--seq", str(seq), "--reps", str(reps)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _size(model: pathlib.Path) -> int:
    data = model.with_name(model.name + ".data")
    return model.stat().st_size + (data.stat().st_size if data.exists() else 0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--w161", type=pathlib.Path, help="model.onnx of a qexport w1.61a16 folder")
    p.add_argument("--fp32", type=pathlib.Path, help="fp32 ONNX (exported here when missing)")
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--also", nargs="+", default=[], metavar="LABEL=PATH",
                   help="more models to measure the same way (e.g. fp32-ext=fp32x/model.onnx)")
    p.add_argument("--reps", type=int, default=20, help="runs per measurement")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--seq", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _child(args.child, args.threads[0], args.seq, args.reps)
        return 0
    if not args.w161 or not args.fp32:
        p.error("--w161 and --fp32 are required")
    if not args.fp32.exists():
        print(f"# exporting fp32 to {args.fp32}", flush=True)
        export_fp32(args.fp32)
    models = {"fp32": args.fp32, "w1.61a16": args.w161}
    for item in args.also:
        label, _, path = item.partition("=")
        if not path:
            p.error(f"--also wants LABEL=PATH, got {item!r}")
        models[label] = pathlib.Path(path)
    print(f"# ORT CPU, QEXPORT_CPU_ISA={os.environ.get('QEXPORT_CPU_ISA', 'auto')}")
    width = max(9, *(len(label) for label in models))
    print(f"{'model':>{width}} {'thr':>3} | {'file MB':>8} | {'1-token ms':>10} {'prefill128 ms':>13} |"
          f" {'peak RSS MiB (1-tok / prefill)':>30}")
    for threads in args.threads:
        for label, path in models.items():
            one = _measure(path, threads, 1, args.reps)
            pre = _measure(path, threads, 128, max(5, args.reps // 4))
            print(f"{label:>{width}} {threads:>3} | {_size(path) / 1e6:8.1f} | "
                  f"{one['median_s'] * 1e3:10.2f} {pre['median_s'] * 1e3:13.2f} | "
                  f"{one['peak_rss_mib']:14.0f} / {pre['peak_rss_mib']:.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
