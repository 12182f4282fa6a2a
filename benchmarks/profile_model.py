"""Where a model's time goes in ONNX Runtime, per op type (by hand, not a test).

Runs a model under ONNX Runtime's profiler and prints, per op type of the graph ORT runs
(after its own fusions), the time per call of the model and the nodes per call, with the
share of the summed kernel time. For a KV-cache model (`model_with_past.onnx`) the cache
is bound in place (bench_model's runner) with --cached positions before the --seq new ones.

    python benchmarks/profile_model.py OUT/model_with_past.onnx --seq 1 --cached 128
    python benchmarks/profile_model.py OUT/model_with_past.onnx --seq 128 --cached 0
    python benchmarks/profile_model.py OUT/model_with_past.onnx --nodes 10   # + slowest nodes
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import pathlib
import statistics
import sys
import tempfile

import bench_linear
import bench_model


def profile(model: pathlib.Path, threads: int, seq: int, cached: int, runs: int,
            max_length: int = 2048) -> tuple[float, dict[str, tuple[float, float]],
                                             dict[tuple[str, str], float]]:
    """(median microseconds per call, {op type: (microseconds per call, nodes per call)},
    {(op type, node name): microseconds per call})."""
    import onnxruntime as ort

    from qexport import native

    so = native.session_options()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    bench_linear.pin_threads(so, threads)
    with tempfile.TemporaryDirectory() as tmp:
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(tmp, "prof")
        sess = ort.InferenceSession(str(model), sess_options=so,
                                    providers=["CPUExecutionProvider"])
        past = any(i.name.startswith("past.") for i in sess.get_inputs())
        run = bench_model._runner(sess, seq, cached if past else 0,
                                  max_length if past else 0)
        for _ in range(runs):
            run()
        events = json.load(open(sess.end_profiling()))
    # The first call warms caches and the pool: left out of both the median and the sums.
    calls = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    start, timed = calls[1]["ts"], len(calls) - 1
    per_op: dict[str, float] = collections.defaultdict(float)
    nodes: collections.Counter = collections.Counter()
    per_node: dict[tuple[str, str], float] = collections.defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and \
                e["ts"] >= start:
            per_op[e["args"]["op_name"]] += e["dur"]
            nodes[e["args"]["op_name"]] += 1
            per_node[(e["args"]["op_name"], e["name"][:-len("_kernel_time")])] += e["dur"]
    return statistics.median(e["dur"] for e in calls[1:]), {
        op: (us / timed, nodes[op] / timed) for op, us in per_op.items()}, {
        key: us / timed for key, us in per_node.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", type=pathlib.Path)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seq", type=int, default=1, help="new tokens per call")
    p.add_argument("--cached", type=int, default=128, help="cached tokens (KV-cache models)")
    p.add_argument("--runs", type=int, default=200, help="calls, the first a warm-up")
    p.add_argument("--nodes", type=int, default=0, help="also list the NODES slowest nodes")
    args = p.parse_args(argv)
    if args.runs < 2:
        p.error("--runs must be at least 2 (the first is a warm-up)")
    median, ops, per_node = profile(args.model, args.threads, args.seq, args.cached,
                                    args.runs)
    total = sum(us for us, _ in ops.values())
    print(f"# {bench_linear.cpu_description()}")
    print(f"# {args.model}: {args.seq} new tokens, {args.cached} cached, {args.threads} threads; "
          f"median call {median / 1e3:.3f} ms under the profiler, summed kernel time "
          f"{total / 1e3:.3f} ms")
    print(f"{'op type':>32} | {'ms/call':>8} {'share':>6} | {'nodes/call':>10} {'us/node':>8}")
    for op, (us, n) in sorted(ops.items(), key=lambda kv: -kv[1][0]):
        print(f"{op:>32} | {us / 1e3:8.3f} {us / total:6.1%} | {n:10.0f} {us / n:8.1f}")
    if args.nodes:
        print(f"\n{'slowest nodes':>32} | {'ms/call':>8} {'share':>6} | op type")
        for (op, name), us in sorted(per_node.items(), key=lambda kv: -kv[1])[:args.nodes]:
            print(f"{name[-32:]:>32} | {us / 1e3:8.3f} {us / total:6.1%} | {op}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
