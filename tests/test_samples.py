"""The numbered samples run on a folder shaped like an export (model.onnx, libqexport_ops.so,
reference.npz) and fail when the outputs disagree with the reference."""
from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from native_helpers import require_library
from qexport import contract as C
from qexport.ops.binary_mixed_linear import binary_mixed_linear_reference
from qexport.testing import random_mixed_linear

ROOT = pathlib.Path(__file__).resolve().parents[1]
PY_SAMPLE = ROOT / "samples" / "01_python_ort" / "run.py"
CPP_SAMPLE = ROOT / "samples" / "02_cpp_ort"
VOCAB, K, N = 50, 96, 24


def _sample_module():
    spec = importlib.util.spec_from_file_location("qexport_sample_01", PY_SAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _model(kind: str):
    """`float`: X [batch, K] -> BinaryMixedLinear -> Y. `tokens`: input_ids [batch, seq] ->
    Gather(embedding) -> BinaryMixedLinear -> logits, with metadata qexport.vocab_size."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from native_helpers import bml_model

    w = random_mixed_linear(N, K, K // 5, 16, with_r2=True, with_bias=True, seed=4)
    emb = np.random.default_rng(5).standard_normal((VOCAB, K)).astype(np.float32)
    if kind == "float":
        return bml_model(w, ["batch", K]), w, emb
    model = bml_model(w, ["batch", "seq", K])
    g = model.graph
    g.initializer.append(numpy_helper.from_array(emb, name="embedding"))
    g.node.insert(0, helper.make_node("Gather", ["embedding", "input_ids"], ["X"], axis=0))
    del g.input[:]
    g.input.append(helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]))
    g.output[0].name = "logits"
    g.node[1].output[0] = "logits"
    helper.set_model_props(model, {"qexport.vocab_size": str(VOCAB),
                                   C.META_CONTRACT: str(C.CONTRACT_VERSION)})
    onnx.checker.check_model(model)
    return model, w, emb


def _folder(tmp_path: pathlib.Path, kind: str, lib: pathlib.Path, with_lib=True,
            with_reference=True) -> pathlib.Path:
    import onnx

    model, w, emb = _model(kind)
    out = tmp_path / f"{kind}_out"
    out.mkdir()
    onnx.save(model, out / "model.onnx")
    if with_lib:
        shutil.copy2(lib, out / lib.name)
    if with_reference:
        rng = np.random.default_rng(6)
        if kind == "float":
            feeds = {"X": rng.standard_normal((3, K)).astype(np.float32)}
            x, out_name = feeds["X"], "Y"
        else:
            feeds = {"input_ids": rng.integers(0, VOCAB, (2, 5), dtype=np.int64)}
            x, out_name = emb[feeds["input_ids"]], "logits"
        y = binary_mixed_linear_reference(torch.from_numpy(x), *w.tensors(), **w.attributes())
        np.savez(out / "reference.npz", **feeds, **{out_name: y.numpy()})
    return out


def _run(cmd, **kw):
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300, **kw)


def _parse(stdout: str) -> dict[str, tuple[float, float]]:
    return {m[0]: (float(m[1]), float(m[2])) for m in
            re.findall(r"reference (\w+): max_abs_diff (\S+) cosine (\S+)", stdout)}


def _checksums(stdout: str) -> dict[str, float]:
    return {m[0]: float(m[1]) for m in re.findall(r"output (\w+): .*checksum (\S+)", stdout)}


@pytest.fixture(scope="module")
def lib():
    return require_library()


@pytest.mark.parametrize("kind", ["float", "tokens"])
def test_python_sample(tmp_path, lib, kind):
    out = _folder(tmp_path, kind, lib)
    proc = _run([sys.executable, PY_SAMPLE, out])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (diff, cos), = _parse(proc.stdout).values()
    assert cos >= 0.999999 and diff < 1e-4, proc.stdout

    # A reference that disagrees makes it fail.
    ref = dict(np.load(out / "reference.npz"))
    name = "Y" if kind == "float" else "logits"
    ref[name] = -ref[name]
    np.savez(out / "reference.npz", **ref)
    proc = _run([sys.executable, PY_SAMPLE, out])
    assert proc.returncode == 1 and "FAIL" in proc.stdout, proc.stdout + proc.stderr


def test_python_sample_without_library_copy_or_reference(tmp_path, lib):
    out = _folder(tmp_path, "tokens", lib, with_lib=False, with_reference=False)
    env = dict(os.environ, QEXPORT_OPS_LIBRARY=str(lib))  # as qexport.native finds it
    proc = _run([sys.executable, PY_SAMPLE, out, "--batch", "2", "--seq", "7"], env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "output logits: shape [2, 7, 24]" in proc.stdout and "not checked" in proc.stdout


@pytest.fixture(scope="module")
def cpp_sample(tmp_path_factory, lib):
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip(reason="cmake not installed: the C++ sample cannot be built")
    build = tmp_path_factory.mktemp("sample_cpp_build")
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    for cmd in ([cmake, "-S", CPP_SAMPLE, "-B", build, *gen], [cmake, "--build", build]):
        proc = _run(cmd)
        assert proc.returncode == 0, f"{cmd}:\n{proc.stdout}\n{proc.stderr}"
    return build / "qexport_sample"


@pytest.mark.parametrize("kind", ["float", "tokens"])
def test_cpp_sample(tmp_path, lib, cpp_sample, kind):
    out = _folder(tmp_path, kind, lib)
    py = _run([sys.executable, PY_SAMPLE, out, "--write-reference-bin"])
    assert py.returncode == 0 and (out / "reference.bin").is_file(), py.stdout + py.stderr

    proc = _run([cpp_sample, out, "--threads", "1"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (diff, cos), = _parse(proc.stdout).values()
    assert cos >= 0.999999 and diff < 1e-4, proc.stdout
    # Same inputs, same kernel: the C++ and Python checksums agree.
    py_sums, cpp_sums = _checksums(py.stdout), _checksums(proc.stdout)
    assert py_sums.keys() == cpp_sums.keys() and py_sums
    for name, s in py_sums.items():
        assert abs(cpp_sums[name] - s) <= 1e-5 * max(1.0, abs(s)), (py.stdout, proc.stdout)

    # A reference that disagrees makes it fail.
    ref = dict(np.load(out / "reference.npz"))
    name = "Y" if kind == "float" else "logits"
    ref[name] = -ref[name]
    _sample_module().write_reference_bin(out / "reference.bin", ref)
    proc = _run([cpp_sample, out])
    assert proc.returncode == 1 and "FAIL" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.parametrize("kind", ["float", "tokens"])
def test_cpp_sample_one_session_many_threads(tmp_path, lib, cpp_sample, kind):
    """The C++ API's view of tests/test_reliability.py: 8 threads share one fresh session
    from its first run, 50 runs each; every output byte-equal to the sequential run's."""
    out = _folder(tmp_path, kind, lib, with_reference=False)
    proc = _run([cpp_sample, out, "--concurrency", "8", "--threads", "2"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "8 threads x 50 runs on one session: 0 of 400 outputs differ" in proc.stdout, proc.stdout


def test_cpp_sample_without_reference(tmp_path, lib, cpp_sample):
    out = _folder(tmp_path, "tokens", lib, with_reference=False)
    proc = _run([cpp_sample, out, "--batch", "2", "--seq", "3"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "output logits: shape [2, 3, 24]" in proc.stdout and "not checked" in proc.stdout


def _kv_folder(tmp_path, lib):
    """A float tiny Llama exported as model.onnx and model_with_past.onnx, the op library
    beside them; returns (folder, the PyTorch model)."""
    from qexport.api import export_with_past
    from qexport.families.attention import fused_attention
    from qexport.onnx_export import export_onnx, trace
    from tiny_models import LogitsOnly, tiny_llama

    model = LogitsOnly(tiny_llama()).eval()
    out = tmp_path / "kv_out"
    out.mkdir()
    example = (torch.zeros(2, 12, dtype=torch.int64),)
    export_onnx(trace(model, example, swap=fused_attention), example, out / "model.onnx", {})
    export_with_past(model, None, out / "model_with_past.onnx")  # floating point
    shutil.copy2(lib, out / lib.name)
    return out, model


def test_cpp_sample_generates_text(tmp_path, lib, cpp_sample):
    """write_prompt.py tokenizes a prompt beside the export; the C++ sample's greedy loop
    prints the text and the same token ids as qexport's Generator."""
    from qexport.generate import Generator
    from tiny_models import save_tokenizer

    out, _ = _kv_folder(tmp_path, lib)
    save_tokenizer(out)
    py = _run([sys.executable, CPP_SAMPLE / "write_prompt.py", out, "--prompt", "Hello"])
    assert py.returncode == 0 and (out / "prompt.bin").is_file(), py.stdout + py.stderr
    proc = _run([cpp_sample, out, "--generate", "10", "--threads", "1"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ids = [int(t) for t in re.search(r"generated ids:((?: \d+)+)", proc.stdout)[1].split()]
    expected = list(Generator(out, threads=1).generate([ord(c) for c in "Hello"], 10))
    assert ids == expected
    text = "Hello" + "".join(chr(i) for i in ids if i)  # token i is chr(i); 0 is <unk>
    assert proc.stdout.startswith(text + "\n"), proc.stdout
    assert re.search(r"10 new tokens; time to first token \S+ ms for 5 prompt tokens; \S+ "
                     r"tokens/s", proc.stdout), proc.stdout
    (out / "prompt.bin").unlink()
    proc = _run([cpp_sample, out, "--generate", "10"])
    assert proc.returncode == 2 and "write_prompt.py" in proc.stderr, proc.stderr


def _trained_tokenizer(kind: str):
    """A small trained BPE tokenizer: GPT-2-style byte level, or SentencePiece-style with
    byte fallback (Llama, Gemma), through transformers as an export folder holds them."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<unk>", "<s>", "</s>"]
    if kind == "byte_level":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=special,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:
        tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                               normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(" ", 1, 0)])
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=special + [
            f"<0x{b:02X}>" for b in range(256)])
    tok.train_from_iterator(["the capital of france is paris, the capital of italy is rome"] * 20,
                            trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


@pytest.mark.parametrize("kind", ["byte_level", "sentencepiece"])
def test_write_prompt_token_bytes(kind):
    """The C++ sample's detokenizer (the bytes of each token, concatenated) gives the
    tokenizer's own decoding, non-ASCII text split into byte tokens included."""
    sys.path.insert(0, str(CPP_SAMPLE))
    try:
        from write_prompt import token_bytes
    finally:
        sys.path.remove(str(CPP_SAMPLE))
    tokenizer = _trained_tokenizer(kind)
    table = token_bytes(tokenizer)
    text = "the capital of Ünïcödé 😀 日本 is  paris\n\tok"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert any(len(table[i]) == 1 and table[i][0] >= 0x80 for i in ids)  # byte tokens used
    joined = b"".join(table[i] for i in ids).decode()
    # SentencePiece's decoder strips the space its normalizer put before the first word
    assert (joined[1:] if kind == "sentencepiece" else joined) == tokenizer.decode(ids) == text
    assert table[tokenizer.eos_token_id] == b""


def test_cpp_sample_kv_cache(tmp_path, lib, cpp_sample):
    """A folder with model_with_past.onnx: the C++ sample runs its generation loop (prompt,
    then one token per call, the cache updated in place through an IoBinding) and compares
    the logits with the PyTorch reference's; a reference that disagrees makes it fail."""
    out, model = _kv_folder(tmp_path, lib)
    ids = torch.randint(0, 100, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = {"input_ids": ids.numpy(), "logits": model(ids).numpy()}
    sample = _sample_module()
    sample.write_reference_bin(out / "reference.bin", ref)
    proc = _run([cpp_sample, out, "--threads", "1"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    kv = re.search(r"KV cache .*6-token prompt, then 6 tokens.*cosine (\S+)", proc.stdout)
    assert kv and float(kv[1]) >= 0.999999, proc.stdout
    ref["logits"][:, -1] *= -1  # the last decoded token's logits
    sample.write_reference_bin(out / "reference.bin", ref)
    proc = _run([cpp_sample, out])
    assert proc.returncode == 1 and "FAIL" in proc.stdout, proc.stdout + proc.stderr
