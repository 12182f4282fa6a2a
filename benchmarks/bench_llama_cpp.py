"""llama.cpp as a peer of qexport on the same SmolLM2 weights (by hand, not a test).

Builds llama.cpp from its public source (the source package of the llama-cpp-python bindings
on the Python package index, which carries llama.cpp's tree under vendor/llama.cpp) into a
cache outside this repository, never vendored; converts the fp32 SmolLM2-135M folder that
qexport quantizes (qexport.models.ensure_example_model) to GGUF, quantizes it to the asked formats
with llama-quantize, and runs llama-bench: a prompt of P tokens into an empty cache and G
decoded tokens after D cached ones, per thread count. Also the stored bits per weight of the
block Linears of each GGUF (attention q/k/v/o and MLP gate/up/down, every byte of their
tensors: blocks with their scales), the quantity qexport reports as bits_per_weight.

    python benchmarks/bench_llama_cpp.py --formats Q4_0 TQ1_0 --threads 1 2
    python benchmarks/bench_model.py ... --llama-cpp Q4_0 TQ1_0     # beside ours, same run

Needs cmake, a C++ compiler and, for the conversion, `pip install sentencepiece` (the
converter imports it; it reads GGUF with the gguf-py of its own source tree).
Cache: $QEXPORT_CACHE/llama.cpp (default ~/.cache/qexport/llama.cpp).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import tarfile

# The CPUs this process may use, read at import: bench_model imports this module before
# bench_linear.pin_threads narrows the calling thread (and so every child it starts) to one
# CPU; llama-bench gets them all back (_unpinned), or its 2 threads would share one CPU.
CPUS = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []

VERSION = "0.3.36"  # llama-cpp-python source package; its vendor/llama.cpp is what we build
BLOCK_LINEAR = re.compile(r"blk\.\d+\.(attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|"
                          r"ffn_down)\.weight$")


def _unpinned() -> None:
    """In the child before exec: every CPU this process could use at import."""
    if CPUS:
        os.sched_setaffinity(0, CPUS)


def cache_root() -> pathlib.Path:
    from qexport import models

    return models.cache_dir() / "llama.cpp"


def _run(cmd: list, log: pathlib.Path | None = None, **kw) -> subprocess.CompletedProcess:
    """Run `cmd`; on failure exit with one line naming it (and its log)."""
    if log is None:
        out = subprocess.run(cmd, capture_output=True, text=True, **kw)
    else:
        with open(log, "w") as f:
            out = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, text=True, **kw)
    if out.returncode:
        last = ((out.stderr or "").strip().splitlines() or [""])[-1][-300:]
        where = f" (log: {log})" if log else f": {last}"
        raise SystemExit(f"llama_cpp: {' '.join(map(str, cmd[:3]))} ... failed{where}")
    return out


def source(version: str = VERSION) -> pathlib.Path:
    """llama.cpp's source tree, downloaded (as the bindings' source package) and unpacked
    into the cache once."""
    root = cache_root() / version
    tree = root / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    if (tree / "CMakeLists.txt").exists():
        return tree
    root.mkdir(parents=True, exist_ok=True)
    print(f"# downloading the llama-cpp-python {version} source package into {root}", flush=True)
    _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
          f"llama-cpp-python=={version}", "-d", str(root)])
    sdist = root / f"llama_cpp_python-{version}.tar.gz"
    with tarfile.open(sdist) as tar:
        try:
            tar.extractall(root, filter="data")  # refuses links and paths out of `root`
        except TypeError:  # a Python before the extraction filters (< 3.10.12 / 3.11.4)
            tar.extractall(root)
    return tree


# CPU paths a build may target: "native" (-march=native, all this CPU has) or "avx2" (AVX2,
# FMA, F16C and no AVX-512: what a CPU without AVX-512 runs; the peer of QEXPORT_CPU_ISA=avx2).
ISA_FLAGS = {
    "native": ["-DGGML_NATIVE=ON"],
    "avx2": ["-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON",
             "-DGGML_F16C=ON", "-DGGML_BMI2=ON", "-DGGML_AVX512=OFF", "-DGGML_AVX512_VBMI=OFF",
             "-DGGML_AVX512_VNNI=OFF", "-DGGML_AVX512_BF16=OFF", "-DGGML_AVX_VNNI=OFF"],
}


def build(version: str = VERSION, isa: str = "native") -> pathlib.Path:
    """The folder of the llama-bench and llama-quantize binaries for CPU path `isa`, built
    once (Release)."""
    tree = source(version)
    out = tree / ("build" if isa == "native" else f"build-{isa}")
    bins = out / "bin"
    if (bins / "llama-bench").exists() and (bins / "llama-quantize").exists():
        return bins
    print(f"# building llama.cpp ({isa}) in {out} (~10 min on 2 cores)", flush=True)
    _run(["cmake", "-B", str(out), "-S", str(tree), "-DCMAKE_BUILD_TYPE=Release",
          *ISA_FLAGS[isa], "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
          "-DLLAMA_BUILD_SERVER=OFF"], log=cache_root() / f"cmake-{isa}.log")
    _run(["cmake", "--build", str(out), "-j", str(os.cpu_count() or 1), "--target",
          "llama-bench", "llama-quantize"], log=cache_root() / f"build-{isa}.log")
    return bins


def gguf(fmt: str, version: str = VERSION) -> pathlib.Path:
    """SmolLM2-135M in GGUF format `fmt` (F32, Q4_0, TQ1_0, ...), made once from qexport's
    fp32 folder of the model: the same weights as qexport quantizes."""
    from qexport import models

    folder = cache_root() / "gguf"
    folder.mkdir(parents=True, exist_ok=True)
    f32 = folder / "smollm2-135m-F32.gguf"
    if not f32.exists():
        tree = source(version)
        print(f"# converting SmolLM2-135M to {f32}", flush=True)
        _run([sys.executable, str(tree / "convert_hf_to_gguf.py"), str(models.ensure_example_model()),
              "--outtype", "f32", "--outfile", str(f32) + ".tmp"], log=folder / "convert.log")
        os.replace(str(f32) + ".tmp", f32)
    if fmt.upper() == "F32":
        return f32
    out = folder / f"smollm2-135m-{fmt}.gguf"
    if not out.exists():
        print(f"# quantizing to {fmt}", flush=True)
        _run([str(build(version) / "llama-quantize"), str(f32), str(out) + ".tmp", fmt],
             log=folder / f"quantize-{fmt}.log")
        os.replace(str(out) + ".tmp", out)
    return out


def block_linear_bits(path: pathlib.Path, version: str = VERSION) -> float:
    """Stored bits per weight of the block Linears of a GGUF file: every byte of their
    tensors over their number of weights (read with the gguf-py of the same source tree)."""
    sys.path.insert(0, str(source(version) / "gguf-py"))
    try:
        from gguf import GGUFReader
    finally:
        sys.path.pop(0)
    nbytes = nweights = 0
    for t in GGUFReader(str(path)).tensors:
        if BLOCK_LINEAR.search(t.name):
            nbytes += int(t.n_bytes)
            nweights += int(t.n_elements)
    if not nweights:
        raise SystemExit(f"llama_cpp: no block Linear tensors in {path}")
    return 8 * nbytes / nweights


def bench(path: pathlib.Path, threads: list[int], prompt: int, gen: int, depth: int,
          reps: int = 5, isa: str = "native",
          version: str = VERSION) -> dict[tuple[str, int], float]:
    """Tokens/s from llama-bench: ("prompt", t) = `prompt` tokens into an empty cache,
    ("decode", t) = `gen` tokens decoded after `depth` cached ones, for each thread count t."""
    exe = str(build(version, isa) / "llama-bench")
    thr = ",".join(map(str, threads))
    out = {}
    for kind, args in (("prompt", ["-p", str(prompt), "-n", "0", "-d", "0"]),
                       ("decode", ["-p", "0", "-n", str(gen), "-d", str(depth)])):
        res = _run([exe, "-m", str(path), "-t", thr, "-r", str(reps), "-o", "json", *args],
                   preexec_fn=_unpinned)
        for row in json.loads(res.stdout):
            out[(kind, int(row["n_threads"]))] = float(row["avg_ts"])
    return out


def table(formats: list[str], threads: list[int], prompt: int, gen: int, depth: int,
          reps: int = 5, isa: str = "native") -> list[dict]:
    """One row per (format, threads): bits per block-Linear weight and tokens/s."""
    rows = []
    for fmt in formats:
        path = gguf(fmt)
        bits = block_linear_bits(path)
        res = bench(path, threads, prompt, gen, depth, reps, isa)
        label = f"llama.cpp {fmt}" + ("" if isa == "native" else f" ({isa})")
        for t in threads:
            rows.append({"label": label, "threads": t, "bits": bits,
                         "decode_tps": res[("decode", t)], "prompt_tps": res[("prompt", t)]})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--formats", nargs="+", default=["Q4_0", "TQ1_0"],
                   help="llama-quantize types [default: %(default)s]")
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--gen", type=int, default=64)
    p.add_argument("--depth", type=int, default=128, help="cached tokens before decoding")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--isa", choices=sorted(ISA_FLAGS), default="native",
                   help="llama.cpp build: native (all this CPU has) or avx2 (no AVX-512)")
    args = p.parse_args(argv)
    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    import bench_linear

    print(f"# {bench_linear.cpu_description()}")
    print(f"# llama.cpp (llama-cpp-python {VERSION} source), llama-bench: prompt {args.prompt} "
          f"tokens into an empty cache; {args.gen} tokens decoded after {args.depth} cached; "
          f"mean of {args.reps}")
    print(f"{'model':>25} {'thr':>3} | {'bits/w':>6} | {'decode tok/s':>12} {'prompt tok/s':>12}")
    for r in table(args.formats, args.threads, args.prompt, args.gen, args.depth, args.reps,
                   args.isa):
        print(f"{r['label']:>25} {r['threads']:>3} | {r['bits']:6.3f} | {r['decode_tps']:12.1f} "
              f"{r['prompt_tps']:12.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
