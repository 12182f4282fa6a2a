"""What an export needs to be served: the tokenizer and generation settings beside the model,
onnxruntime-genai's genai_config.json, and a Triton Inference Server model repository.

Everything here works from the out/ folder alone (no access to the original model): the
pipeline writes the tokenizer, generation_config.json and genai_config.json into out/ when it
writes model_with_past.onnx; `write_triton_repository(out, repo)` lays out a repository from a
finished folder (`qexport triton OUT`). docs/serving.md says how each is used.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .errors import QexportError

WITH_PAST = "model_with_past.onnx"
GENAI_CONFIG = "genai_config.json"
GENERATION_CONFIG = "generation_config.json"
# onnxruntime-genai allocates its shared KV buffer at the search's max_length: the default
# stays this small even for long-context models (a user raises it in the file or per call).
GENAI_MAX_LENGTH = 2048
# The KV-cache decoder's tensor names (api.export_with_past), as genai's printf patterns.
PAST_NAMES = ("past.%d.key", "past.%d.value")
PRESENT_NAMES = ("present.%d.key", "present.%d.value")


def write_tokenizer(tokenizer, hf_model, out: Path) -> list[Path]:
    """The tokenizer files (with the chat template, where the model has one) and
    generation_config.json into `out`; returns the files written."""
    before = set(out.iterdir())
    try:
        tokenizer.save_pretrained(out)
        generation = getattr(hf_model, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(out)
    except Exception as e:  # a tokenizer class that cannot save itself
        raise QexportError(f"cannot write the tokenizer: {e}") from e
    return sorted(set(out.iterdir()) - before)


def stop_tokens(folder: Path, tokenizer=None) -> list[int]:
    """The token ids that end generation: generation_config.json's eos_token_id (an id or a
    list), else the tokenizer's eos token."""
    ids: list[int] = []
    path = folder / GENERATION_CONFIG
    if path.is_file():
        eos = json.loads(path.read_text()).get("eos_token_id")
        ids = [eos] if isinstance(eos, int) else [int(i) for i in eos or []]
    if not ids and tokenizer is not None and tokenizer.eos_token_id is not None:
        ids = [int(tokenizer.eos_token_id)]
    return ids


def decoder_shape(path: Path) -> dict:
    """Layers, kv heads, head size and vocabulary of a KV-cache decoder file, read from its
    inputs and outputs (past.{i}.key [B, kv heads, P, head size], logits [B, 1, V])."""
    import onnx

    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as e:  # a missing, truncated or foreign file
        raise QexportError(f"cannot read {path}: {e}") from e

    def dims(values):
        return {v.name: [d.dim_value if d.HasField("dim_value") else None
                         for d in v.type.tensor_type.shape.dim] for v in values}
    inputs, outputs = dims(graph.input), dims(graph.output)
    keys = [n for n in inputs if n.startswith("past.") and n.endswith(".key")]
    if not keys or "logits" not in outputs:
        raise QexportError(f"{path} has no past.{{i}}.key inputs and logits output: not a "
                           "qexport KV-cache decoder")
    return {"layers": len(keys), "kv_heads": inputs[keys[0]][1],
            "head_size": inputs[keys[0]][3], "vocab_size": outputs["logits"][-1]}


def genai_config(shape: dict, hf_config, generation: dict, context: int | None,
                 library: bool = True) -> dict:
    """onnxruntime-genai's configuration of a qexport KV-cache decoder: model type "decoder"
    (any decoder-only model with the names mapped), the op library loaded through
    session_options.custom_ops_library (where the decoder needs it: `library`), and the
    past/present buffers shared (the decoder writes each step's keys and values into the
    buffer in place)."""
    from .native import LIBRARY_NAME

    def cfg(*names, default=None):
        return next((getattr(hf_config, n) for n in names
                     if isinstance(getattr(hf_config, n, None), int)), default)

    eos = generation.get("eos_token_id")
    pad = generation.get("pad_token_id")
    if pad is None:
        pad = eos[0] if isinstance(eos, list) and eos else eos
    context = context or GENAI_MAX_LENGTH
    heads = cfg("num_attention_heads", "n_head", default=shape["kv_heads"])
    return {
        "model": {
            "bos_token_id": generation.get("bos_token_id") or 0,
            "eos_token_id": eos if eos is not None else 0,
            "pad_token_id": pad if pad is not None else 0,
            "context_length": context,
            "vocab_size": shape["vocab_size"] or cfg("vocab_size", default=0),
            "type": "decoder",
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai",
                                    **({"custom_ops_library": LIBRARY_NAME} if library else {}),
                                    "provider_options": []},
                "filename": WITH_PAST,
                "head_size": shape["head_size"],
                "hidden_size": cfg("hidden_size", "n_embd", default=heads * shape["head_size"]),
                "num_attention_heads": heads,
                "num_hidden_layers": shape["layers"],
                "num_key_value_heads": shape["kv_heads"],
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "past_key_names": PAST_NAMES[0], "past_value_names": PAST_NAMES[1]},
                "outputs": {"logits": "logits", "present_key_names": PRESENT_NAMES[0],
                            "present_value_names": PRESENT_NAMES[1]},
            },
        },
        "search": {"diversity_penalty": 0.0, "do_sample": False, "early_stopping": True,
                   "length_penalty": 1.0, "max_length": min(context, GENAI_MAX_LENGTH),
                   "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": True,
                   "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 1, "top_p": 1.0},
    }


def write_genai_config(out: Path, hf_config, context: int | None) -> Path:
    """out/genai_config.json for out/model_with_past.onnx (and the files beside it)."""
    generation = {}
    if (out / GENERATION_CONFIG).is_file():
        generation = json.loads((out / GENERATION_CONFIG).read_text())
    config = genai_config(decoder_shape(out / WITH_PAST), hf_config, generation, context,
                          library=_needs_library(out / WITH_PAST))
    path = out / GENAI_CONFIG
    path.write_text(json.dumps(config, indent=4) + "\n")
    return path


# ------------------------------------------------------------------------------------ Triton
TRITON_MOUNT = "/models"  # where the docker command of docs/serving.md mounts the repository
_ONNX_TYPES = {"tensor(int64)": "TYPE_INT64", "tensor(int32)": "TYPE_INT32",
               "tensor(float)": "TYPE_FP32", "tensor(float16)": "TYPE_FP16"}


def _link(src: Path, dst: Path) -> None:
    """dst as a hard link to src (a copy across file systems)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _tensors(values) -> str:
    """config.pbtxt input/output entries of onnxruntime NodeArgs (every dim dynamic or fixed
    as in the file; max_batch_size 0, so the batch dim is part of dims)."""
    rows = []
    for v in values:
        if v.type not in _ONNX_TYPES:
            raise QexportError(f"tensor {v.name} has type {v.type}, which the Triton "
                               "configuration does not map")
        dims = ", ".join(str(d) if isinstance(d, int) and d >= 0 else "-1" for d in v.shape)
        rows.append(f'  {{\n    name: "{v.name}"\n    data_type: {_ONNX_TYPES[v.type]}\n'
                    f"    dims: [ {dims} ]\n  }}")
    return ",\n".join(rows)


def _needs_library(path: Path) -> bool:
    import onnx

    from . import ops

    return ops.needs_library(onnx.load(str(path), load_external_data=False))


def _onnx_model_config(name: str, session, filename: str, library: str | None) -> str:
    return (f'name: "{name}"\nbackend: "onnxruntime"\nmax_batch_size: 0\n'
            f'default_model_filename: "{filename}"\n'
            f"input [\n{_tensors(session.get_inputs())}\n]\n"
            f"output [\n{_tensors(session.get_outputs())}\n]\n"
            f'instance_group [ {{ kind: KIND_CPU, count: 1 }} ]\n'
            + (f'model_operations {{ op_library_filename: [ "{library}" ] }}\n' if library
               else ""))


def write_triton_repository(out: Path, repo: Path, name: str = "qexport") -> list[Path]:
    """A Triton model repository at `repo` from the export in `out`: `<name>` (model.onnx
    through the ONNX Runtime backend, the op library in model_operations), `<name>_decoder`
    (model_with_past.onnx, where the export has one) and `<name>_trt` (model.engine through
    the TensorRT backend, where one was built; its plugin library is loaded by the server's
    --backend-config, docs/serving.md). The model files are hard links to out/'s. Returns the
    config.pbtxt files written."""
    from . import native

    out, repo = Path(out), Path(repo)
    if not (out / "model.onnx").is_file():
        raise QexportError(f"{out} has no model.onnx: not a qexport output folder")
    if repo.exists() and any(repo.iterdir()):
        raise QexportError(f"{repo} exists and is not empty")
    library = out / native.LIBRARY_NAME
    if not library.is_file() and _needs_library(out / "model.onnx"):
        library = native.library_path()
    data = [p for p in (out / "model.onnx.data",) if p.is_file()]
    written = []
    models = [(name, "model.onnx")]
    if (out / WITH_PAST).is_file():
        models.append((f"{name}_decoder", WITH_PAST))
    for model_name, filename in models:
        version = repo / model_name / "1"
        for f in [out / filename, *data]:
            _link(f, version / f.name)
        needs = _needs_library(out / filename)  # (not for ONNX Runtime's own ops only)
        if needs:
            _link(library, version / native.LIBRARY_NAME)
        session = native.make_session(out / filename, library=library if needs else None)
        config = repo / model_name / "config.pbtxt"
        config.write_text(_onnx_model_config(
            model_name, session, filename,
            f"{TRITON_MOUNT}/{model_name}/1/{native.LIBRARY_NAME}" if needs else None))
        written.append(config)
    engine = out / "model.engine"
    if engine.is_file():
        from .targets.trt import TRT_LIBRARY_NAME, trt_library_path
        model_name = f"{name}_trt"
        version = repo / model_name / "1"
        _link(engine, version / "model.plan")
        plugin = out / TRT_LIBRARY_NAME
        _link(plugin if plugin.is_file() else trt_library_path(), version / TRT_LIBRARY_NAME)
        session = native.make_session(out / "model.onnx", library=library)
        config = repo / model_name / "config.pbtxt"
        config.write_text(
            f'name: "{model_name}"\nbackend: "tensorrt"\nmax_batch_size: 0\n'
            f'default_model_filename: "model.plan"\n'
            f"input [\n{_tensors(session.get_inputs())}\n]\n"
            f"output [\n{_tensors(session.get_outputs())}\n]\n"
            f"instance_group [ {{ kind: KIND_GPU, count: 1 }} ]\n")
        written.append(config)
    return written
