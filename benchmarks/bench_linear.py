"""Benchmark of the qexport::BinaryMixedLinear CPU kernel against ONNX Runtime's own ops.

Not a test (nothing under tests/ imports it). Per shape (given as N x K: out_features x
in_features; X is [M, K], Y is [M, N]), per M and per intra-op thread count, one-node ONNX
Runtime sessions on the same random X (--contenders; default all):
- ours (one per --isa path, e.g. ours:avx512, ours:avx2): qexport::BinaryMixedLinear, w1.61
  (20 % salient channels, one salient group per row, unless --salient / --salient-group say
  otherwise; no r2, no bias), random packed weights (qexport.testing.random_mixed_linear),
  the CPU path forced by QEXPORT_CPU_ISA;
- fp32: ONNX MatMul with an fp32 [K, N] initializer (MLAS);
- nbits4, nbits2: com.microsoft MatMulNBits, bits=4 or 2, block_size=32, accuracy_level 0,
  weights quantized by a plain round-to-nearest with a zero point per block;
- nbits2lut: the 2-bit op with the session option mlas.use_lut_gemm=1 (ONNX Runtime's
  lookup-table GEMM; it quantizes X to int8 per block, so its output is not the exact one).
Reported: median wall latency per layer, effective weight GB/s (stored weight bytes /
latency) and each contender's time over the first ours' (> 1: ours is faster), all measured
in the same run with the sessions taking turns in blocks (_time_all), and the process CPU
time per layer (getrusage; summed over threads), which shows threads spinning. The header
prints the CPU's model and SIMD flags.

Where the weights are (--weights):
- layers (default): each session holds enough copies of its layer, each with weights of its
  own, to fill twice the last-level cache, all reading X and each writing its own output;
  one run is one pass over them and the time per layer is the run's over the copies. Every
  layer then reads its weights from DRAM, and ONNX Runtime's pool threads stay awake
  between layers, as when a model too large for the cache decodes.
- evict: one copy, a 64 MiB read evicts it before every run, which starts every run cold in
  every respect: pool threads asleep after that read, the op's code, scratch and X evicted
  too (4096x4096, M = 1, ours at 2 threads: 0.082-0.111 ms against 0.060-0.092 with layers;
  docs/performance.md).
- cached: one copy, nothing evicted.

    python benchmarks/bench_linear.py                      # everything (several minutes)
    python benchmarks/bench_linear.py --shapes 4096x4096 --m 1 256 --threads 1
    python benchmarks/bench_linear.py --bandwidth          # also memory bandwidth (numpy)
    python benchmarks/bench_linear.py --weights cached     # weights left in the caches
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

# The bandwidth probe is one thread: numpy's BLAS (the dot product) must not spread out.
for _var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

SHAPES = ["576x576", "1536x576", "576x1536", "4096x4096", "11008x4096", "4096x11008"]


# Our layers' salient channels (a fraction of K) and salient group size (0: one group a row):
# w1.61's, unless --salient / --salient-group ask for another (1.0 / 64: the 4-bit head).
SALIENT = [0.2, 0]


def _random_ours(n, k, seed=0):
    from qexport.testing import random_mixed_linear

    return random_mixed_linear(n, k, int(round(SALIENT[0] * k)), SALIENT[1], seed=seed)


def _model_ours(n, k, seed=0):
    from onnx import TensorProto, helper, numpy_helper

    from qexport import contract as C
    from qexport.ops.binary_mixed_linear import contract as B
    from qexport import ops

    ops.register_onnx_schemas()
    w = _random_ours(n, k, seed=seed)
    names = list(B.INPUT_NAMES)
    inits, node_inputs, nbytes = [], ["X"], 0
    for i, t in enumerate(w.tensors(), start=1):
        if t is None:
            node_inputs.append("")
            continue
        a = t.numpy()
        nbytes += a.nbytes
        inits.append(numpy_helper.from_array(a, name=names[i]))
        node_inputs.append(names[i])
    while node_inputs[-1] == "":
        node_inputs.pop()
    node = helper.make_node(B.OP_NAME, node_inputs, ["Y"], domain=C.DOMAIN,
                            **w.attributes())
    graph = helper.make_graph([node], "ours",
                              [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["M", k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])],
                              initializer=inits)
    model = helper.make_model(graph, ir_version=10,
                              opset_imports=[helper.make_opsetid("", 17),
                                             helper.make_opsetid(C.DOMAIN, C.OPSET_VERSION)])
    return model, nbytes


def _last_level_cache() -> int:
    """Bytes of CPU 0's last-level cache (Linux sysfs; 32 MiB where it cannot be read)."""
    import glob

    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            text = open(path).read().strip().upper()
        except OSError:
            continue
        unit = {"K": 1 << 10, "M": 1 << 20}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KM")) * unit)
    return max(sizes, default=32 << 20)


MAX_COPIES = 1024


def copies_for(weight_bytes: int, weights: str) -> int:
    """Layers per session: enough to fill twice the last-level cache (--weights layers)."""
    if weights != "layers":
        return 1
    return int(min(MAX_COPIES, max(2, -(-2 * _last_level_cache() // weight_bytes))))


def _layers(build, copies: int):
    """One model of `copies` layers: build(i) -> (one-node model reading X and writing Y,
    weight bytes), each layer's initializers renamed apart, every layer reading X and writing
    Y<i>. Returns (model, weight bytes of one layer)."""
    from onnx import helper

    nodes, inits, outputs, nbytes = [], [], [], 0
    for i in range(copies):
        model, nbytes = build(i)
        g = model.graph
        for init in g.initializer:
            init.name = f"l{i}.{init.name}"
            inits.append(init)
        for node in g.node:
            node.input[:] = [x if x in ("X", "") else f"l{i}.{x}" for x in node.input]
            node.output[:] = [f"Y{i}"]
            nodes.append(node)
        out = g.output[0]
        out.name = f"Y{i}"
        outputs.append(out)
    graph = helper.make_graph(nodes, "layers", [g.input[0]], outputs, initializer=inits)
    return helper.make_model(graph, ir_version=model.ir_version,
                             opset_imports=list(model.opset_import)), nbytes


def _model_fp32(n, k, rng):
    from onnx import TensorProto, helper, numpy_helper

    w = (rng.standard_normal((k, n), dtype=np.float32) * 0.02)
    node = helper.make_node("MatMul", ["X", "W"], ["Y"])
    graph = helper.make_graph([node], "fp32",
                              [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["M", k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])],
                              initializer=[numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 17)])
    return model, w.nbytes


def _model_nbits(n, k, rng, block=32, bits=4):
    """MatMulNBits per the ONNX Runtime contrib-op doc: B uint8 [N, k_blocks, block * bits / 8],
    scales [N * k_blocks], zero_points uint8 [N * ceil(k_blocks * bits / 8)] (8 / bits zero
    points a byte, low bits first); element i of a block in bits (i * bits) % 8 of byte
    i * bits / 8."""
    from onnx import TensorProto, helper, numpy_helper

    per = 8 // bits
    levels = (1 << bits) - 1
    k_blocks = (k + block - 1) // block
    w = rng.standard_normal((n, k_blocks * block), dtype=np.float32) * 0.02
    w[:, k:] = 0
    wb = w.reshape(n, k_blocks, block)
    lo, hi = wb.min(-1), wb.max(-1)
    scale = np.maximum(hi - lo, 1e-8) / levels
    zp = np.clip(np.round(-lo / scale), 0, levels).astype(np.uint8)
    q = np.clip(np.round(wb / scale[..., None]) + zp[..., None], 0, levels).astype(np.uint8)

    def pack(v):  # [..., m * per] -> [..., m] bytes, low bits first
        out = np.zeros(v.shape[:-1] + (v.shape[-1] // per,), np.uint8)
        for i in range(per):
            out |= (v[..., i::per] << (bits * i)).astype(np.uint8)
        return out

    b = pack(q)  # [N, k_blocks, block * bits / 8]
    zp_pad = np.zeros((n, -(-k_blocks // per) * per), np.uint8)
    zp_pad[:, :k_blocks] = zp
    zpp = pack(zp_pad).reshape(-1)
    scales = scale.astype(np.float32).reshape(-1)
    node = helper.make_node("MatMulNBits", ["X", "B", "scales", "zero_points"], ["Y"],
                            domain="com.microsoft", K=k, N=n, bits=bits, block_size=block)
    graph = helper.make_graph(
        [node], f"nbits{bits}",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["M", k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])],
        initializer=[numpy_helper.from_array(b, "B"), numpy_helper.from_array(scales, "scales"),
                     numpy_helper.from_array(zpp, "zero_points")])
    model = helper.make_model(graph, ir_version=10,
                              opset_imports=[helper.make_opsetid("", 17),
                                             helper.make_opsetid("com.microsoft", 1)])
    return model, b.nbytes + scales.nbytes + zpp.nbytes


CONTENDERS = ("ours", "fp32", "nbits4", "nbits2", "nbits2lut")


def cpu_description() -> str:
    """The CPU's model name and the SIMD flags that choose kernels (Linux /proc/cpuinfo)."""
    want = ("avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512vbmi",
            "avx512_vnni", "avx512_bf16", "amx_int8", "asimd", "sve")
    model, flags = "unknown CPU", set()
    try:
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown CPU":
                model = value.strip()
            elif key.strip() in ("flags", "Features") and not flags:
                flags = set(value.split())
    except OSError:
        pass
    have = [f for f in want if f in flags]
    return f"{model}; {os.cpu_count()} CPUs; flags: {' '.join(have) or 'none of ' + ' '.join(want)}"


# The CPUs this process may use, read before pin_threads narrows the calling thread's set.
_CPUS = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
PIN_THREADS = True  # --no-pin turns it off


def pin_threads(options, threads: int) -> bool:
    """One CPU per thread (Linux): the calling thread on the first CPU this process may use
    (process-wide, from then on), ONNX Runtime's threads - 1 intra-op workers on the next ones
    (session.intra_op_thread_affinities, 1-based ids). Unpinned, the scheduler sometimes ran
    a pool thread on the caller's CPU for a whole measurement: the 2-thread median of one
    op came out 0.052 or 0.093 ms from one block of runs to the next (4096x4096, M = 1,
    weights cached), whichever session it was. Returns whether it pinned."""
    if not PIN_THREADS or not hasattr(os, "sched_setaffinity") or threads > len(_CPUS):
        return False
    os.sched_setaffinity(0, {_CPUS[0]})
    if threads > 1:
        options.add_session_config_entry("session.intra_op_thread_affinities",
                                         ";".join(str(c + 1) for c in _CPUS[1:threads]))
    return True


def _session(model, threads, custom, config=None):
    import onnxruntime as ort

    from qexport import native

    so = native.session_options() if custom else ort.SessionOptions()
    for key, value in (config or {}).items():
        so.add_session_config_entry(key, value)
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    pin_threads(so, threads)
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(model.SerializeToString(), sess_options=so,
                                providers=["CPUExecutionProvider"])


def _bind(session, x):
    """An IO binding of X and a preallocated Y: a run then costs the op plus ORT's dispatch,
    without the Python binding's per-run conversion and allocation (~10 us, the same for
    every contender, which would flatten the ratios of the fast M = 1 cases)."""
    import onnxruntime as ort

    binding = session.io_binding()
    binding.bind_ortvalue_input("X", ort.OrtValue.ortvalue_from_numpy(x))
    for out in session.get_outputs():
        binding.bind_ortvalue_output(out.name, ort.OrtValue.ortvalue_from_numpy(
            np.empty((x.shape[0], out.shape[-1]), x.dtype)))
    return binding


# Read before every timed run with --weights evict, so that each run finds its weights in
# DRAM. Made on first use: bench_model imports this module (pin_threads), and 64 MiB
# allocated at import would count in its peak-RSS figures.
_EVICT: list = []


def _time_all(sessions, x, min_time, weights="layers", block=10):
    """Median wall latency and mean process CPU time per layer of each session: name ->
    (session, layers in it). With weights == "evict" every run is preceded by an untimed
    64 MiB read (_EVICT). The sessions take turns in blocks of `block` runs, with a pause
    before each block: ONNX Runtime's pool threads spin for milliseconds after a run, and a
    spinning pool of one session takes a core from the next session's run (the previous
    version alternated run by run, which skewed the 2-thread numbers)."""
    import resource

    evict = weights == "evict"
    if evict and not _EVICT:
        _EVICT.append(np.ones((64 << 20) // 4, np.float32))
    bindings = {name: _bind(s, x) for name, (s, _) in sessions.items()}
    wall = {name: [] for name in sessions}
    cpu = {name: 0.0 for name in sessions}
    t_end = time.perf_counter() + min_time * len(sessions)
    while time.perf_counter() < t_end or len(wall[next(iter(wall))]) < 2 * block:
        for name, (s, _) in sessions.items():
            time.sleep(0.05)
            s.run_with_iobinding(bindings[name])
            for _ in range(block):
                if evict:
                    _EVICT[0].sum()
                r0 = resource.getrusage(resource.RUSAGE_SELF)
                t0 = time.perf_counter()
                s.run_with_iobinding(bindings[name])
                wall[name].append(time.perf_counter() - t0)
                r1 = resource.getrusage(resource.RUSAGE_SELF)
                cpu[name] += (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    layers = {name: n for name, (_, n) in sessions.items()}
    return ({n: statistics.median(v) / layers[n] for n, v in wall.items()},
            {n: c / len(wall[n]) / layers[n] for n, c in cpu.items()})


def memory_bandwidth(mb=512, reps=5):
    """GB/s of one thread, best of reps over `mb` MiB fp32 arrays (far above any cache):
    (read+write of a numpy copy, bytes copied, read by a dot product of two arrays)."""
    a = np.ones(mb * 1024 * 1024 // 4, np.float32)
    b = np.empty_like(a)
    best_copy = best_dot = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        np.copyto(b, a)
        best_copy = min(best_copy, time.perf_counter() - t0)
    half = a.size // 2
    for _ in range(reps):
        t0 = time.perf_counter()
        np.dot(a[:half], b[half:])
        best_dot = min(best_dot, time.perf_counter() - t0)
    return (2 * a.nbytes / best_copy / 1e9, a.nbytes / best_copy / 1e9,
            a.nbytes / best_dot / 1e9)


def _contenders(names, isas):
    """Contender labels in order: ours:<isa> per --isa (plain "ours" for the path the
    environment gives), then the others named."""
    labels = []
    for name in names:
        if name == "ours":
            labels += [f"ours:{isa}" for isa in isas] if isas else ["ours"]
        else:
            labels.append(name)
    return labels


def _build(label, n, k, rng):
    """label -> build(i) returning (one-node model, weight bytes), and its session extras."""
    if label.startswith("ours"):
        return (lambda i: _model_ours(n, k, seed=i)), True, None
    if label == "fp32":
        return (lambda i: _model_fp32(n, k, rng)), False, None
    bits = int(label[5])
    config = {"mlas.use_lut_gemm": "1"} if label.endswith("lut") else None
    return (lambda i: _model_nbits(n, k, rng, bits=bits)), False, config


def _with_isa(label, make):
    """make() with QEXPORT_CPU_ISA set to the label's path (read when a session creates the
    kernel), the environment restored after."""
    isa = label.partition(":")[2]
    if not isa:
        return make()
    old = os.environ.get("QEXPORT_CPU_ISA")
    os.environ["QEXPORT_CPU_ISA"] = isa
    try:
        return make()
    finally:
        if old is None:
            del os.environ["QEXPORT_CPU_ISA"]
        else:
            os.environ["QEXPORT_CPU_ISA"] = old


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=SHAPES, help="N x K (out x in) [default: all]")
    p.add_argument("--m", nargs="+", type=int, default=[1, 8, 64, 256], help="rows of X")
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    p.add_argument("--isa", nargs="+", choices=("portable", "avx2", "avx512"), default=[],
                   help="one 'ours' per CPU path (QEXPORT_CPU_ISA) [default: the "
                        "environment's]; ratios are over the first")
    p.add_argument("--min-time", type=float, default=0.5, help="seconds per measurement")
    p.add_argument("--bandwidth", action=argparse.BooleanOptionalAction, default=False,
                   help="also measure one thread's memory bandwidth (numpy copy, dot product)")
    p.add_argument("--weights", choices=("layers", "evict", "cached"), default="layers",
                   help="where each run finds the weights: layers = in DRAM, a session holding "
                        "copies of the layer past twice the last-level cache (as decoding a "
                        "large model); evict = in DRAM, evicted before every run by a 64 MiB "
                        "read; cached = left in the caches (SmolLM2's 23 MB of w1.61 weights "
                        "fit this L3)")
    p.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                   help="compare our output with the PyTorch reference once per shape")
    p.add_argument("--salient", type=float, default=SALIENT[0],
                   help="ours: salient (4-bit) fraction of K [default: %(default)s, w1.61's]")
    p.add_argument("--salient-group", type=int, default=SALIENT[1],
                   help="ours: salient channels per scale group, 0: one group a row "
                        "[default: %(default)s]; --salient 1 --salient-group 64 is the 4-bit "
                        "head of the default export")
    p.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True,
                   help="pin each thread to its own CPU, every contender alike (pin_threads)")
    args = p.parse_args(argv)
    global PIN_THREADS
    PIN_THREADS = args.pin
    SALIENT[:] = [args.salient, args.salient_group]
    labels = _contenders(args.contenders, args.isa)
    if not labels[0].startswith("ours"):
        p.error("the contenders must include ours (the ratios are over it)")
    first = labels[0]

    rng = np.random.default_rng(0)
    print(f"# qexport bench_linear; {cpu_description()}")
    print(f"# CPU path of ours: {', '.join(args.isa) or os.environ.get('QEXPORT_CPU_ISA', 'auto')}"
          f"; ours {args.salient:.0%} salient, group {args.salient_group or 'a row'}; shapes are N x K (out x in); weights: {args.weights} (last-level cache "
          f"{_last_level_cache() >> 20} MiB); "
          f"threads {'pinned, one CPU each' if args.pin else 'not pinned'}")
    if args.bandwidth:
        rw, r, read = memory_bandwidth()
        print(f"# memory, 1 thread: numpy copy {rw:.1f} GB/s read+write ({r:.1f} GB/s copied); "
              f"dot product {read:.1f} GB/s read")
    others = labels[1:]
    width = max(9, *(len(lb) for lb in labels))
    hdr = (f"{'shape NxK':>11} {'M':>4} {'thr':>3} | ms: " +
           " ".join(f"{lb:>{width}}" for lb in labels) + " | GB/s: " +
           " ".join(f"{lb:>{width}}" for lb in labels) + f" | time / {first}: " +
           " ".join(f"{lb:>{width}}" for lb in others))
    print(hdr)
    print("-" * len(hdr))
    for shape in args.shapes:
        n, k = (int(v) for v in shape.lower().split("x"))
        models, copies, singles, extras = {}, {}, {}, {}
        for label in labels:
            build, custom, config = _build(label, n, k, rng)
            extras[label] = (custom, config)
            singles[label] = build(0)
            copies[label] = copies_for(singles[label][1], args.weights)
            models[label] = (singles[label] if copies[label] == 1
                             else _layers(build, copies[label]))
        if args.check:
            import torch

            from qexport.ops.binary_mixed_linear import binary_mixed_linear_reference

            w = _random_ours(n, k, seed=0)
            x = rng.standard_normal((3, k), dtype=np.float32)
            ref = binary_mixed_linear_reference(torch.from_numpy(x), *w.tensors(),
                                                **w.attributes()).numpy()
            for label in labels:
                if label.startswith("ours"):
                    (y,) = _with_isa(label, lambda: _session(singles[label][0], 1, True)).run(
                        None, {"X": x})
                    err = np.abs(y - ref).max() / np.abs(ref).max()
                    assert err < 1e-4, f"{shape} {label}: differs from the reference by {err:.2e}"
        for threads in args.threads:
            sessions = {
                label: (_with_isa(label, lambda: _session(models[label][0], threads,
                                                          *extras[label])), copies[label])
                for label in labels}
            for m in args.m:
                x = rng.standard_normal((m, k), dtype=np.float32)
                t, cpu = _time_all(sessions, x, args.min_time, args.weights)
                gbs = {lb: models[lb][1] / t[lb] / 1e9 for lb in t}
                print(f"{shape:>11} {m:>4} {threads:>3} | ms: " +
                      " ".join(f"{t[lb] * 1e3:{width}.3f}" for lb in labels) + " | GB/s: " +
                      " ".join(f"{gbs[lb]:{width}.1f}" for lb in labels) +
                      f" | time / {first}: " +
                      " ".join(f"{t[lb] / t[first]:{width}.2f}" for lb in others) +
                      " | cpu ms " + "/".join(f"{cpu[lb] * 1e3:.3f}" for lb in labels),
                      flush=True)
        print(f"# {shape}: stored weight bytes " +
              ", ".join(f"{lb} {models[lb][1]}" for lb in labels) +
              f" ({8 * models[first][1] / (n * k):.3f} bits/weight for ours); layers per "
              "session " + ", ".join(f"{lb} {copies[lb]}" for lb in labels), flush=True)
    print("# stored weight bytes: ours (inputs 1-9), fp32 (N*K*4), nbits (B+scales+zp)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
