"""Text generation from an export folder: `qexport generate` and `qexport chat`.

`Generator(folder)` runs out/model_with_past.onnx (the KV-cache decoder) with ONNX Runtime and
the folder's op library: the prompt in one call with an empty cache, then one token per call.
The cache is one buffer per past input, as long as the prompt plus the new tokens, bound
(IOBinding) as both the `past.{i}.*` input and the `present.{i}.*` output, so that ONNX Runtime
writes each step's keys and values into it in place (no per-token copy; docs/format.md).
Tokens are picked greedily or sampled (temperature, top-k, top-p, seed) from the last
logits; generation stops at an end-of-sequence token, after max_new_tokens, or at the model's
context. The tokenizer and chat template come from the folder (serving.write_tokenizer).
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import QexportError
from .serving import GENAI_CONFIG, WITH_PAST, decoder_shape

MAX_NEW_TOKENS = 128  # `qexport generate`'s default


@dataclasses.dataclass
class Sampling:
    """How the next token is picked from the logits: greedily (temperature 0) or sampled from
    softmax(logits / temperature), cut to the top_k most likely (0: all) and then to the
    smallest set whose probability reaches top_p."""
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def validate(self) -> None:
        if not self.temperature >= 0:
            raise QexportError(f"--temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise QexportError(f"--top-k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise QexportError(f"--top-p must be within (0, 1], got {self.top_p}")

    def pick(self, logits: np.ndarray, rng: np.random.Generator) -> int:
        if self.temperature == 0:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / self.temperature
        if 0 < self.top_k < z.size:
            z[z < np.partition(z, -self.top_k)[-self.top_k]] = -np.inf
        p = np.exp(z - z.max())
        p /= p.sum()
        if self.top_p < 1:
            order = np.argsort(-p, kind="stable")
            before = np.cumsum(p[order]) - p[order]  # probability of the more likely ones
            p[order[before >= self.top_p]] = 0
            p /= p.sum()
        return int(rng.choice(p.size, p=p))


@dataclasses.dataclass
class Stats:
    """Of one generate() call: time to first token (the prompt's call and the pick) and the
    rate of the tokens after it."""
    prompt_tokens: int
    new_tokens: int = 0
    first_token_s: float = 0.0
    rest_s: float = 0.0  # the new tokens after the first
    stopped: str = ""  # "eos", "max_new_tokens" or "context"

    @property
    def tokens_per_s(self) -> float | None:
        return (self.new_tokens - 1) / self.rest_s if self.new_tokens > 1 and self.rest_s \
            else None

    def line(self) -> str:
        rate = self.tokens_per_s
        return (f"{self.new_tokens} new tokens ({self.stopped}); time to first token "
                f"{1e3 * self.first_token_s:.0f} ms for {self.prompt_tokens} prompt tokens; "
                + (f"{rate:.1f} tokens/s after it" if rate else "no tokens after it"))


class Generator:
    """Generates from an export folder's KV-cache decoder (batch 1)."""

    def __init__(self, folder: str | Path, threads: int | None = None):
        from . import native

        self.folder = Path(folder)
        path = self.folder / WITH_PAST
        if not self.folder.is_dir():
            raise QexportError(f"no such folder: {self.folder}")
        if not path.is_file():
            raise QexportError(
                f"{self.folder} has no {WITH_PAST} (the KV-cache decoder generation needs): "
                f"export a causal LM with `qexport MODEL -o {self.folder}` (it writes one where "
                "the family has one, docs/models.md; --kv-cache insists)")
        self.shape = decoder_shape(path)
        library = self.folder / native.LIBRARY_NAME
        self.session = native.make_session(path, threads=threads,
                                           library=library if library.is_file() else None)
        self.context = None
        if (self.folder / GENAI_CONFIG).is_file():
            self.context = json.loads((self.folder / GENAI_CONFIG).read_text())[
                "model"].get("context_length")
        self.stats: Stats | None = None

    def generate(self, prompt: list[int], max_new_tokens: int = MAX_NEW_TOKENS,
                 sampling: Sampling | None = None, stop: list[int] = ()) -> Iterator[int]:
        """Yields the new token ids as they are picked; `self.stats` holds the timings (final
        once the iterator is exhausted)."""
        import onnxruntime as ort

        sampling = sampling or Sampling()
        sampling.validate()
        if not prompt:
            raise QexportError("the prompt is empty")
        if max_new_tokens < 1:
            raise QexportError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
        vocab = self.shape["vocab_size"]
        if vocab and not all(0 <= t < vocab for t in prompt):
            raise QexportError(f"prompt token ids must be within [0, {vocab})")
        total = len(prompt) + max_new_tokens
        if self.context:
            if len(prompt) >= self.context:
                raise QexportError(f"the prompt has {len(prompt)} tokens; the model takes at "
                                   f"most {self.context}")
            total = min(total, self.context)
        rng = np.random.default_rng(sampling.seed)
        binding = self.session.io_binding()
        binding.bind_output("logits")
        cache_shape = (1, self.shape["kv_heads"], total, self.shape["head_size"])
        for i in range(self.shape["layers"]):
            for kind in ("key", "value"):
                buffer = ort.OrtValue.ortvalue_from_numpy(np.zeros(cache_shape, np.float32))
                binding.bind_ortvalue_input(f"past.{i}.{kind}", buffer)
                binding.bind_ortvalue_output(f"present.{i}.{kind}", buffer)
        stats = self.stats = Stats(len(prompt))
        ids, length = np.asarray([prompt], np.int64), len(prompt)
        t0 = time.perf_counter()
        while True:
            binding.bind_cpu_input("input_ids", ids)
            binding.bind_cpu_input("attention_mask", np.ones((1, length), np.int64))
            self.session.run_with_iobinding(binding)
            token = sampling.pick(binding.get_outputs()[0].numpy()[0, -1], rng)
            now = time.perf_counter()
            if stats.new_tokens == 0:
                stats.first_token_s = now - t0
            else:
                stats.rest_s = now - t0 - stats.first_token_s
            stats.new_tokens += 1
            yield token
            if token in stop:
                stats.stopped = "eos"
            elif stats.new_tokens >= max_new_tokens:
                stats.stopped = "max_new_tokens"
            elif len(prompt) + stats.new_tokens >= total:  # (as many as the context takes)
                stats.stopped = "context"
            if stats.stopped:
                return
            ids, length = np.asarray([[token]], np.int64), length + 1


def load_tokenizer(folder: Path):
    """The folder's tokenizer (transformers), or None when it has none."""
    if not (folder / "tokenizer_config.json").is_file():
        return None
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # files of a tokenizer class this transformers cannot read
        raise QexportError(f"cannot load the tokenizer in {folder}: {e}") from e


class TextStream:
    """Turns token ids, one at a time, into the text they add (held back while the text ends
    in an incomplete UTF-8 sequence, as byte-level tokens can)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.text = tokenizer, [], ""

    def add(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        new, self.text = text[len(self.text):], text
        return new


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The prompt ids of a conversation through the tokenizer's chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise QexportError("the tokenizer has no chat template: use `qexport generate`")
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # a BatchEncoding in some versions
        ids = ids["input_ids"]
    return [int(t) for t in ids]

