"""Tokenize a prompt beside an export, for the C++ sample's `--generate` (main.cpp).

    python samples/02_cpp_ort/write_prompt.py OUT --prompt "The capital of France is"

writes OUT/prompt.bin with what a C++ program needs to generate text without a tokenizer
library: the prompt's token ids, the ids that end generation, and the bytes each vocabulary
entry stands for (the detokenizer is then a table lookup). Format, little endian:

    "QXPRM001"
    u32 prompt text length, its UTF-8 bytes
    u32 n, i64 prompt ids[n]
    u32 m, i64 stop ids[m]
    u32 vocabulary size V, then per id 0..V-1: u32 length, the token's bytes

A token's bytes are those it adds to the text: the byte-level table's inverse for GPT-2-style
tokenizers, <0xNN> byte-fallback tokens as the byte NN and "▁" as a space for SentencePiece
ones, nothing for special tokens. (onnxruntime-genai's wheel ships no C headers, and no C++
tokenizer comes from the package registries, hence this file.)
"""
from __future__ import annotations

import argparse
import json
import re
import struct
import sys
from pathlib import Path

MAGIC = b"QXPRM001"


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character that stands for each byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _decoder_types(tokenizer) -> set[str]:
    """The types in the fast tokenizer's decoder (a Sequence lists several)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return set()
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    return {d.get("type") for d in decoder.get("decoders", [decoder])}


def token_bytes(tokenizer) -> list[bytes]:
    """The bytes each token id adds to the text (b"" for special tokens)."""
    special = set(tokenizer.all_special_ids)
    vocab = len(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(range(vocab)))
    byte_level = "ByteLevel" in _decoder_types(tokenizer)
    table = _byte_decoder() if byte_level else {}
    out = []
    for i, piece in enumerate(pieces):
        byte = None if byte_level or piece is None else re.fullmatch(r"<0x([0-9A-F]{2})>", piece)
        if byte:  # SentencePiece byte fallback (some tokenizers list these as special)
            out.append(bytes([int(byte[1], 16)]))
        elif i in special or piece is None:
            out.append(b"")
        elif byte_level:
            out.append(bytes(table[c] for c in piece) if all(c in table for c in piece)
                       else tokenizer.decode([i]).encode())
        elif "▁" in piece:
            out.append(piece.replace("▁", " ").encode())
        else:
            out.append(tokenizer.decode([i]).encode())
    return out


def write_prompt(folder: Path, prompt: str) -> Path:
    from qexport.errors import QexportError
    from qexport.generate import load_tokenizer
    from qexport.serving import stop_tokens

    tokenizer = load_tokenizer(folder)
    if tokenizer is None:
        raise QexportError(f"{folder} has no tokenizer (tokenizer_config.json)")
    ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    stop = stop_tokens(folder, tokenizer)
    text = prompt.encode()
    parts = [MAGIC, struct.pack("<I", len(text)), text,
             struct.pack(f"<I{len(ids)}q", len(ids), *ids),
             struct.pack(f"<I{len(stop)}q", len(stop), *stop)]
    table = token_bytes(tokenizer)
    parts.append(struct.pack("<I", len(table)))
    for b in table:
        parts += [struct.pack("<I", len(b)), b]
    path = folder / "prompt.bin"
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(b"".join(parts))
    tmp.replace(path)
    return path


def main() -> int:
    from qexport.errors import QexportError

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("output", type=Path, help="a folder written by qexport")
    p.add_argument("--prompt", required=True)
    args = p.parse_args()
    try:
        path = write_prompt(args.output, args.prompt)
    except QexportError as e:
        print(f"write_prompt.py: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
