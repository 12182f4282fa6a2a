#!/usr/bin/env python3
"""Run an exported qexport model folder with ONNX Runtime (Python).

The folder holds model.onnx and, usually, a copy of libqexport_ops.so (`qexport export` puts
one there); without it the library of the installed qexport package is used. Inputs: int64
inputs get random token ids in [0, vocab) (vocab from the model's metadata
"qexport.vocab_size", else 100), float inputs random normal values. If the folder has
reference.npz (arrays named after the model's inputs and outputs), those inputs are fed and
the outputs compared: max abs diff and cosine; exit status 1 if a cosine is below 0.999.
If the folder also has model_with_past.onnx (`qexport --kv-cache`), the reference tokens go
through it as a generation loop does (the first half as the prompt with an empty cache, then
one token per call, the cache a buffer of the full length that ONNX Runtime updates in
place) and the logits it returns (the last token's of each call) are compared with the
reference too.

    python samples/01_python_ort/run.py OUT_DIR [--threads N] [--batch B] [--seq S]
        [--write-reference-bin]   # also write OUT_DIR/reference.bin for samples/02_cpp_ort
"""
from __future__ import annotations

import argparse
import pathlib
import struct
import sys

import numpy as np

MIN_COSINE = 0.999
LIBRARY_NAME = "libqexport_ops.so"
# reference.bin: the format samples/02_cpp_ort reads (see its README.md).
BIN_MAGIC = b"QXREF001"
ONNX_DTYPES = {np.dtype(np.float32): 1, np.dtype(np.int32): 6, np.dtype(np.int64): 7,
               np.dtype(np.float16): 10}


def find_library(folder: pathlib.Path) -> pathlib.Path:
    local = folder / LIBRARY_NAME
    if local.is_file():
        return local
    from qexport import native  # the installed package's library

    return native.library_path()


def make_inputs(session, vocab: int, batch: int, seq: int, rng) -> dict[str, np.ndarray]:
    feeds = {}
    for inp in session.get_inputs():
        symbolic = 0
        shape = []
        for d in inp.shape:
            if isinstance(d, int) and d >= 0:
                shape.append(d)
            else:  # first symbolic dim: batch; later ones: sequence
                shape.append(batch if symbolic == 0 else seq)
                symbolic += 1
        if inp.type == "tensor(int64)":
            feeds[inp.name] = rng.integers(0, vocab, size=shape, dtype=np.int64)
        elif inp.type == "tensor(int32)":
            feeds[inp.name] = rng.integers(0, vocab, size=shape, dtype=np.int32)
        elif inp.type in ("tensor(float)", "tensor(float16)"):
            dtype = np.float32 if inp.type == "tensor(float)" else np.float16
            feeds[inp.name] = rng.standard_normal(shape).astype(dtype)
        else:
            raise SystemExit(f"run.py: input {inp.name!r} has unsupported type {inp.type}")
    return feeds


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    den = np.linalg.norm(a) * np.linalg.norm(b)
    if den == 0:
        return 1.0 if np.array_equal(a, b) else 0.0
    return float(a @ b / den)


def write_reference_bin(path: pathlib.Path, tensors: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as f:
        f.write(BIN_MAGIC + struct.pack("<I", len(tensors)))
        for name, arr in tensors.items():
            arr = np.ascontiguousarray(arr)
            if arr.dtype not in ONNX_DTYPES:
                arr = arr.astype(np.float32)
            raw = name.encode()
            f.write(struct.pack("<I", len(raw)) + raw)
            f.write(struct.pack("<II", ONNX_DTYPES[arr.dtype], arr.ndim))
            f.write(struct.pack(f"<{arr.ndim}q", *arr.shape))
            f.write(arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes())


def decode_with_past(session, ids: np.ndarray, prompt: int) -> np.ndarray:
    """Logits of positions prompt-1 .. T-1 of `ids` [1, T] from a KV-cache model, which returns
    the last token's logits: `prompt` tokens in one call, then one token per call. The cache
    is one buffer of T positions per layer and kind (past.i.key, ...), bound as both the past
    input and the present output: ONNX Runtime writes each call's new keys/values into it in
    place; attention_mask (ones, one per token so far) tells it how much of it is filled."""
    import onnxruntime as ort

    binding = session.io_binding()
    binding.bind_output("logits")  # first: get_outputs() lists the outputs as bound
    for i in session.get_inputs():
        if i.name.startswith("past."):
            cache = ort.OrtValue.ortvalue_from_numpy(
                np.zeros((1, i.shape[1], ids.shape[1], i.shape[3]), np.float32))
            binding.bind_ortvalue_input(i.name, cache)
            binding.bind_ortvalue_output("present." + i.name[len("past."):], cache)
    logits, start = [], 0
    for stop in [prompt] + list(range(prompt + 1, ids.shape[1] + 1)):
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(ids[:, start:stop]))
        binding.bind_cpu_input("attention_mask", np.ones((1, stop), np.int64))
        session.run_with_iobinding(binding)
        logits.append(binding.get_outputs()[0].numpy().copy())  # a view of a reused buffer
        start = stop
    return np.concatenate(logits, axis=1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", type=pathlib.Path, help="folder holding model.onnx")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads")
    ap.add_argument("--batch", type=int, default=1, help="size of the first symbolic dim")
    ap.add_argument("--seq", type=int, default=16, help="size of the other symbolic dims")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--write-reference-bin", action="store_true",
                    help="write reference.bin (inputs fed + reference or ORT outputs)")
    args = ap.parse_args(argv)

    import onnxruntime as ort

    model = args.folder / "model.onnx"
    if not model.is_file():
        print(f"run.py: error: {model} does not exist", file=sys.stderr)
        return 2
    lib = find_library(args.folder)
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(lib))
    if args.threads:
        options.intra_op_num_threads = args.threads
    session = ort.InferenceSession(str(model), sess_options=options,
                                   providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    vocab = int(meta.get("qexport.vocab_size", 100))
    print(f"model {model} with {lib}")

    ref_path = args.folder / "reference.npz"
    reference = dict(np.load(ref_path)) if ref_path.is_file() else {}
    feeds = make_inputs(session, vocab, args.batch, args.seq, np.random.default_rng(args.seed))
    for name in feeds:
        if name in reference:
            feeds[name] = reference[name]
    for name, arr in feeds.items():
        print(f"input {name}: shape {list(arr.shape)} {arr.dtype}")

    names = [o.name for o in session.get_outputs()]
    outputs = dict(zip(names, session.run(names, feeds)))
    ok = True
    for name, y in outputs.items():
        checksum = float(np.asarray(y, dtype=np.float64).sum())
        print(f"output {name}: shape {list(y.shape)} {y.dtype} checksum {checksum:.6e}")
        if name in reference:
            ref = reference[name]
            if ref.shape != y.shape:
                print(f"reference {name}: shape {list(ref.shape)} differs")
                ok = False
                continue
            diff = float(np.abs(y.astype(np.float64) - ref.astype(np.float64)).max()) if y.size else 0.0
            cos = cosine(y, ref)
            print(f"reference {name}: max_abs_diff {diff:.3e} cosine {cos:.8f}")
            ok &= cos >= MIN_COSINE
    with_past = args.folder / "model_with_past.onnx"
    if with_past.is_file() and "input_ids" in reference and "logits" in reference:
        past_session = ort.InferenceSession(str(with_past), sess_options=options,
                                            providers=["CPUExecutionProvider"])
        ids = reference["input_ids"][:1]
        prompt = ids.shape[1] // 2
        y = decode_with_past(past_session, ids, prompt)
        cos = cosine(y, reference["logits"][:1, prompt - 1:])
        print(f"KV cache ({with_past.name}): {ids.shape[1] // 2}-token prompt, then "
              f"{ids.shape[1] - ids.shape[1] // 2} tokens one by one: cosine {cos:.8f}")
        ok &= cos >= MIN_COSINE
    if args.write_reference_bin:
        expected = {n: reference.get(n, outputs[n]) for n in names}
        write_reference_bin(args.folder / "reference.bin", {**feeds, **expected})
        print(f"wrote {args.folder / 'reference.bin'}")
    if not reference:
        print("no reference.npz: outputs not checked")
    print("OK" if ok else f"FAIL: cosine below {MIN_COSINE}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
