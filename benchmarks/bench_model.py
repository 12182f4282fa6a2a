"""End-to-end benchmark: SmolLM2-135M exported fp32 vs w1.61a16 (qexport ops) in ONNX Runtime.

Not a test. Per thread count:
- single-token forward latency (input_ids [1, 1]; no KV cache: the exports take the whole
  sequence) and 128-token prefill latency (input_ids [1, 128]), medians, with every model's
  session in one process, the models taking turns in blocks of runs, so that noise from other
  tenants of the machine hits all models alike and the ratios hold;
- peak RSS (VmHWM) of a fresh subprocess per model (session creation + 1-token runs), so that
  it belongs to that model alone;
plus the model file size.

Inputs:
    qexport smollm2-135m -o OUT --no-perplexity        # the w1.61a16 folder
    python benchmarks/bench_model.py --w161 OUT/model.onnx --fp32 fp32/model.onnx
The fp32 ONNX is written by this script when --fp32 names a missing file:
torch.onnx.export(dynamo=True) of qexport.models.load_model("smollm2-135m").module through
qexport.onnx_export's trace/export_onnx helpers (so with the same fused attention and graph
cleanups as the quantized export), example batch 2, dynamic batch and sequence.
--fp32-unfused PATH adds an fp32 export without the fused attention (written when missing).
--w161-past OUT/model_with_past.onnx --fp32-past PATH (written when missing) add a decoding
table: one token after --cached tokens with a KV cache (the cache copied every call, or
updated in place in buffers of --max-length positions), against the whole-sequence forward.
--llama-cpp FORMAT... then adds llama.cpp on the same weights (benchmarks/bench_llama_cpp.py:
built from source into a cache, GGUF per format, llama-bench) in tokens/s beside the
in-place rows, with the stored bits per block-Linear weight of each.
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

import bench_linear  # noqa: E402  (this folder: pin_threads)
import bench_llama_cpp  # noqa: E402  (before any pinning: it keeps the process's CPU set)


def export_fp32(path: pathlib.Path, fused_attention: bool = True) -> None:
    import torch

    from qexport import models, onnx_export as export

    loaded = models.load_model("smollm2-135m")
    example = (torch.randint(0, 1000, (2, 16)),)
    from qexport.families.attention import fused_attention as swap
    gm = export.trace(loaded.module, example, swap=swap if fused_attention else None)
    if fused_attention:  # the contrib-op fusions the quantized export gets
        from qexport import api
        gm = api.float_graph(gm)
    path.parent.mkdir(parents=True, exist_ok=True)
    export.export_onnx(gm, example, path, metadata={}, input_names=["input_ids"],
                       output_names=["logits"])


def _session(model, threads: int):
    import onnxruntime as ort

    from qexport import native

    so = native.session_options()  # the qexport ops registered (harmless for fp32)
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    bench_linear.pin_threads(so, threads)
    return ort.InferenceSession(str(model), sess_options=so, providers=["CPUExecutionProvider"])


def _runner(sess, seq: int, past: int = 0, buffer: int = 0):
    """A function that runs `sess` once on input_ids [1, seq]. A KV-cache model gets `past`
    cached positions (attention_mask [1, past + seq]): in past inputs of that length, whose
    presents ONNX Runtime allocates one position longer (a copy of the cache per call), or
    with `buffer` (>= past + seq) in cache buffers of that length bound as both the past
    inputs and the present outputs, which ONNX Runtime updates in place."""
    import numpy as np
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    feed = {"input_ids": rng.integers(0, 49152, (1, seq)).astype(np.int64)}
    cache = [i for i in sess.get_inputs() if i.name.startswith("past.")]
    if cache:
        feed["attention_mask"] = np.ones((1, past + seq), np.int64)
    if not buffer:
        for i in cache:
            feed[i.name] = rng.standard_normal((1, i.shape[1], past, i.shape[3]),
                                               dtype=np.float32)
        return lambda: sess.run(None, feed)
    binding = sess.io_binding()
    for name, value in feed.items():
        binding.bind_cpu_input(name, value)
    for i in cache:
        value = ort.OrtValue.ortvalue_from_numpy(
            rng.standard_normal((1, i.shape[1], buffer, i.shape[3]), dtype=np.float32))
        binding.bind_ortvalue_input(i.name, value)
        binding.bind_ortvalue_output("present." + i.name[len("past."):], value)
    binding.bind_output("logits")
    return lambda: sess.run_with_iobinding(binding)


def _latencies(models: dict, threads: int, seq: int, reps: int, block: int = 10,
               past: int = 0, buffer: dict | None = None) -> dict[str, float]:
    """Median seconds per run of each model, the sessions taking turns in blocks of `block`
    runs. Between blocks the process sleeps, so that the previous session's pool threads,
    which spin for a while after a run, are idle again and take no core from the next.
    `buffer`: label -> cache buffer length of the KV-cache models run in place (_runner)."""
    buffer = buffer or {}
    runs = {label: _runner(_session(path, threads), seq, past, buffer.get(label, 0))
            for label, path in models.items()}
    times = {label: [] for label in runs}
    for _ in range(max(1, reps // block)):
        for label, run in runs.items():
            time.sleep(0.05)
            run()  # warm: caches, and the pool threads awake
            for _ in range(block):
                t0 = time.perf_counter()
                run()
                times[label].append(time.perf_counter() - t0)
    return {label: statistics.median(v) for label, v in times.items()}


def _child(model: str, threads: int, reps: int) -> None:
    """Peak RSS of a process that creates one session and runs 1-token forwards: VmHWM of
    /proc/self/status on Linux (ru_maxrss would include the parent's peak, carried over
    fork and exec), else ru_maxrss."""
    import resource

    run = _runner(_session(model, threads), 1)
    for _ in range(reps):
        run()
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    status = pathlib.Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                peak_kib = int(line.split()[1])
    print(json.dumps({"peak_rss_mib": peak_kib / 1024}))


def _peak_rss_mib(model: pathlib.Path, threads: int, reps: int) -> float:
    out = subprocess.run([sys.executable, __file__, "--child", str(model), "--threads",
                          str(threads), "--reps", str(reps)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mib"]


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
    p.add_argument("--fp32-unfused", type=pathlib.Path,
                   help="also an fp32 ONNX without the fused attention (exported when missing)")
    p.add_argument("--w161-past", type=pathlib.Path,
                   help="model_with_past.onnx of a qexport --kv-cache folder: also time decoding")
    p.add_argument("--also-past", nargs="+", default=[], metavar="LABEL=PATH",
                   help="more KV-cache models for the decoding table, run in place (e.g. "
                        "w1.61a16-share-r2=share/model_with_past.onnx)")
    p.add_argument("--fp32-past", type=pathlib.Path,
                   help="fp32 KV-cache ONNX for the decoding table (exported when missing)")
    p.add_argument("--cached", type=int, default=128,
                   help="cached tokens before the decoded one [default: %(default)s]")
    p.add_argument("--max-length", type=int, default=2048,
                   help="cache buffer length of the in-place decoding rows [default: "
                        "%(default)s]")
    p.add_argument("--llama-cpp", nargs="+", default=[], metavar="FORMAT",
                   help="with --w161-past: also llama.cpp in these GGUF formats (e.g. Q4_0 "
                        "TQ1_0; benchmarks/bench_llama_cpp.py)")
    p.add_argument("--reps", type=int, default=20, help="runs per measurement")
    p.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True,
                   help="pin each thread to its own CPU, every model alike "
                        "(bench_linear.pin_threads)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    bench_linear.PIN_THREADS = args.pin
    if args.child:
        _child(args.child, args.threads[0], args.reps)
        return 0
    if not args.w161 or not args.fp32:
        p.error("--w161 and --fp32 are required")
    if not args.fp32.exists():
        print(f"# exporting fp32 to {args.fp32}", flush=True)
        export_fp32(args.fp32)
    models = {"fp32": args.fp32, "w1.61a16": args.w161}
    if args.fp32_unfused:
        if not args.fp32_unfused.exists():
            print(f"# exporting fp32 without the fused attention to {args.fp32_unfused}",
                  flush=True)
            export_fp32(args.fp32_unfused, fused_attention=False)
        models["fp32-unfused"] = args.fp32_unfused
    for item in args.also:
        label, _, path = item.partition("=")
        if not path:
            p.error(f"--also wants LABEL=PATH, got {item!r}")
        models[label] = pathlib.Path(path)
    print(f"# {bench_linear.cpu_description()}", flush=True)
    print(f"# ORT CPU, QEXPORT_CPU_ISA={os.environ.get('QEXPORT_CPU_ISA', 'auto')}; latencies: "
          f"median of {args.reps} (1 token) / {max(5, args.reps // 4)} (prefill) runs, models "
          f"taking turns in one process, threads {'pinned' if args.pin else 'not pinned'}; "
          "peak RSS: a fresh process per model", flush=True)
    width = max(9, *(len(label) for label in models))
    print(f"{'model':>{width}} {'thr':>3} | {'file MB':>8} | {'1-token ms':>10} {'prefill128 ms':>13} |"
          f" {'fp32/model 1-tok':>16} {'prefill':>7} | {'peak RSS MiB':>12} {'/ fp32':>6}")
    for threads in args.threads:
        one = _latencies(models, threads, 1, args.reps)
        pre = _latencies(models, threads, 128, max(5, args.reps // 4))
        rss = {label: _peak_rss_mib(path, threads, 10) for label, path in models.items()}
        for label, path in models.items():
            print(f"{label:>{width}} {threads:>3} | {_size(path) / 1e6:8.1f} | "
                  f"{one[label] * 1e3:10.2f} {pre[label] * 1e3:13.2f} | "
                  f"{one['fp32'] / one[label]:16.2f} {pre['fp32'] / pre[label]:7.2f} | "
                  f"{rss[label]:12.0f} {rss[label] / rss['fp32']:6.2f}", flush=True)
    if args.w161_past:
        paths, decode = _decode_table(args)
        if args.llama_cpp:
            _peer_table(args, paths, decode)
    elif args.llama_cpp:
        p.error("--llama-cpp needs --w161-past (it compares decoding with a KV cache)")
    return 0


def _decode_table(args) -> tuple[dict[str, pathlib.Path], dict[int, tuple[dict, dict]]]:
    """One decoded token after `--cached` tokens: the KV-cache models, and for comparison the
    whole-sequence forward of the models without a cache (what a generation loop without a
    cache pays per token). Returns the KV-cache models by row label, and threads -> (seconds
    per decoded token, per prompt) by row label."""
    if not args.fp32_past:
        raise SystemExit("--w161-past needs --fp32-past")
    if args.max_length <= args.cached:
        raise SystemExit(f"--max-length ({args.max_length}) must exceed --cached ({args.cached})")
    if not args.fp32_past.exists():
        from qexport import api, models

        print(f"# exporting fp32 with a KV cache to {args.fp32_past}", flush=True)
        args.fp32_past.parent.mkdir(parents=True, exist_ok=True)
        api.export_with_past(models.load_model("smollm2-135m").module, None, args.fp32_past)
    cached = args.cached
    print(f"# decoding: 1 token after {cached} cached ones (KV cache) against the forward of all "
          f"{cached + 1} tokens (no cache); prompt: {cached} tokens into an empty cache (KV "
          f"cache: last token's logits) against model.onnx's {cached}-token forward", flush=True)
    print(f"# kv cache: past inputs of the cached length, presents one longer (ORT copies the "
          f"cache every call); in place: cache buffers of {args.max_length} positions bound as "
          f"both pasts and presents (IOBinding; ORT writes the new token into them). Ratios: "
          f"fp32 of the same kind over the row", flush=True)
    kv_models = {"fp32 + kv cache": args.fp32_past, "w1.61a16 + kv cache": args.w161_past,
                 "fp32 + kv in place": args.fp32_past,
                 "w1.61a16 + kv in place": args.w161_past}
    for item in args.also_past:
        label, _, path = item.partition("=")
        if not path:
            raise SystemExit(f"--also-past wants LABEL=PATH, got {item!r}")
        kv_models[f"{label} + kv in place"] = pathlib.Path(path)
    in_place = {label: args.max_length for label in kv_models if label.endswith("in place")}
    full_models = {"fp32, no cache": args.fp32, "w1.61a16, no cache": args.w161}
    width = max(len(label) for label in [*kv_models, *full_models])
    print(f"{'model':>{width}} {'thr':>3} | {'1 token ms':>10} {'fp32/row':>9} | "
          f"{'prompt ms':>9} {'fp32/row':>9}")
    results = {}
    for threads in args.threads:
        reps = max(5, args.reps // 4)
        step = {**_latencies(kv_models, threads, 1, args.reps, past=cached, buffer=in_place),
                **_latencies(full_models, threads, cached + 1, reps)}
        prompt = {**_latencies(kv_models, threads, cached, reps, buffer=in_place),
                  **_latencies(full_models, threads, cached, reps)}
        for label in step:
            base = "fp32 + kv in place" if label in in_place else "fp32 + kv cache"
            print(f"{label:>{width}} {threads:>3} | {step[label] * 1e3:10.2f} "
                  f"{step[base] / step[label]:9.2f} | {prompt[label] * 1e3:9.2f} "
                  f"{prompt[base] / prompt[label]:9.2f}", flush=True)
        results[threads] = (step, prompt)
    return kv_models, results


def _bits(model: pathlib.Path) -> float | None:
    """Stored bits per block-Linear weight from the qexport folder's report.json."""
    report = model.parent / "report.json"
    return json.loads(report.read_text())["bits"]["bits_per_weight"] if report.exists() else None


def _peer_table(args, paths: dict[str, pathlib.Path],
                decode: dict[int, tuple[dict, dict]]) -> None:
    """Tokens/s of the in-place rows of the decoding table beside llama.cpp's on the same
    weights (llama-bench: the same prompt length; --cached tokens then 64 decoded, mean)."""
    rows = []
    for threads, (step, prompt) in decode.items():
        for label in step:
            if not label.endswith("in place"):
                continue
            bits = 32.0 if label.startswith("fp32") else _bits(paths[label])
            rows.append({"label": label, "threads": threads, "bits": bits,
                         "decode_tps": 1 / step[label], "prompt_tps": args.cached / prompt[label]})
    # llama.cpp's build for the CPU path the qexport rows ran on (QEXPORT_CPU_ISA)
    isa = "avx2" if os.environ.get("QEXPORT_CPU_ISA") == "avx2" else "native"
    gen, reps = 64, 5  # llama-bench: tokens decoded (its tokens/s are a mean over them), runs
    rows += bench_llama_cpp.table(args.llama_cpp, args.threads, args.cached, gen, args.cached,
                                  reps=reps, isa=isa)
    print(f"# tokens/s: qexport's in-place rows above (1 token after {args.cached} cached; "
          f"{args.cached}-token prompt) beside llama.cpp on the same weights (llama-bench: "
          f"{gen} tokens decoded after {args.cached} cached, the {args.cached}-token prompt; "
          f"mean of {reps}). bits/w: stored bits per block-Linear weight. Ratio: tokens/s over "
          f"w1.61a16's at the same threads", flush=True)
    print(f"{'model':>30} {'thr':>3} | {'bits/w':>6} | {'decode tok/s':>12} {'/ ours':>6} | "
          f"{'prompt tok/s':>12} {'/ ours':>6}")
    ours_rows = {r["threads"]: r for r in rows if r["label"] == "w1.61a16 + kv in place"}
    for r in sorted(rows, key=lambda r: r["threads"]):
        base = ours_rows[r["threads"]]
        bits = "-" if r["bits"] is None else f"{r['bits']:.3f}"
        print(f"{r['label']:>30} {r['threads']:>3} | {bits:>6} | {r['decode_tps']:12.1f} "
              f"{r['decode_tps'] / base['decode_tps']:6.2f} | {r['prompt_tps']:12.1f} "
              f"{r['prompt_tps'] / base['prompt_tps']:6.2f}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
