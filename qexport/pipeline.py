"""The out/-folder job: load, data, quantize (trace, calibrate, passes), export, check,
report, all written atomically (a temp folder renamed into place), then the target's own
step (e.g. a TensorRT engine). `run(RunConfig(...))` is what `qexport MODEL` does; the CLI
only parses its arguments into a RunConfig and prints.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

from . import checkpoint, targets
from .config import RunConfig
from .contract import META_SOURCE, META_VOCAB_SIZE
from .errors import Interrupted, QexportError, stage

Progress = Callable[[str], None]


@dataclasses.dataclass
class RunResult:
    output: Path
    report: dict
    parity_ok: bool
    finish: targets.Finish | None = None  # the target's step after the folder was written


PARITY_TOKENS = 128  # per row of the end-to-end parity batch (2 rows)
# Activation-quantized exports: ORT's end-to-end error against fp may exceed the PyTorch
# reference's by this factor (plus the parity threshold's slack): docs/design.md
ROUNDING_SLACK = 1.1


@dataclasses.dataclass
class _Data:
    calib: list  # [(input_ids [1, L],), ...]
    calib_source: str
    # end-to-end tuning's sequences where it asks for more than the calibration rows (those
    # first, then the text's next ones), else None: the calibration rows
    tune: list | None = None
    eval_ids: object = None  # held-out token ids [T] or None
    eval_source: str | None = None
    ppl_skipped: str | None = None
    # held-out token ids for the parity checks where no perplexity is computed (an encoder,
    # --no-perplexity) but a tokenizer exists: real text, not random tokens
    parity_ids: object = None


def run(config: RunConfig, progress: Progress | None = None) -> RunResult:
    """Quantize `config.model` and write `config.output`; see RunConfig for the settings.
    Raises QexportError (one line) for anything the user's input or model causes; on any
    failure up to the folder's writing it is left as it was (a target's step after it, e.g.
    the TensorRT engine, reports its outcome in `RunResult.finish`)."""
    say = progress or (lambda msg: None)
    config.validate()
    target = targets.get(config.target)
    config = dataclasses.replace(config, quantize=_for_target(config, target))
    out = Path(config.output)
    work = work_folder(out)
    if not config.resume:
        checkpoint.remove(work)
    tmp = _prepare_output(out, config.force)
    try:
        report = _run_into(config, target, tmp, work, say)
        with _signals_deferred():  # an interrupt now lands after the commit
            _commit_output(tmp, out)
    except BaseException as e:
        if not tmp.exists() and out.exists() and isinstance(e, KeyboardInterrupt):
            checkpoint.remove(work)  # the interrupt came once the output was in place
            raise Interrupted(f"{out} was written completely before the interrupt") from None
        shutil.rmtree(tmp, ignore_errors=True)
        kept = checkpoint.describe(work)
        hint = kept and (f"PTQ1.61 learning of {kept} is kept in {work}: rerun the same "
                         "command to continue from there (--no-resume starts over)")
        if isinstance(e, KeyboardInterrupt):
            raise Interrupted(f"nothing was written to {out}" + (f"; {hint}" if hint else "")
                              ) from None
        if hint and isinstance(e, QexportError):
            raise QexportError(f"{e}; {hint}") from e
        if hint:
            say(hint)
        raise
    checkpoint.remove(work)
    result = RunResult(out, report, report["parity"]["ok"])
    if result.parity_ok:
        say(f"wrote {out}/ (model.onnx, "
            + ("op library, " if report["op_library"] else "no op library needed, ")
            + "report.md)")
        if target.finish is not None:
            result.finish = target.finish(out, say)
    return result


def work_folder(output: Path) -> Path:
    """Where a run keeps what an interruption must not lose (PTQ1.61's finished blocks,
    qexport.checkpoint): hidden beside the output folder; removed once the output is written."""
    output = Path(output).absolute()
    return output.parent / f".{output.name}.resume"


def _run_into(config: RunConfig, target: targets.Target, tmp: Path, work: Path,
              say: Progress) -> dict:
    import torch

    from . import api, models

    # a resumed run keeps the interrupted one's thread count (its bytes depend on it)
    config = dataclasses.replace(config, threads=config.threads or
                                 checkpoint.saved_threads(work) or idle_cores())
    torch.set_num_threads(config.threads)
    say(f"{config.threads} thread(s)")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    say(f"loading {config.model}")
    with stage(f"loading {config.model}"):
        lm = models.load_model(config.model, trust_pickle=config.trust_pickle)
    timings["load"] = time.perf_counter() - t0
    with stage("reading the calibration and evaluation text"):
        config, context_note = _within_context(config, lm.module)
        if context_note:
            say(context_note)
        # before the text is read: what end-to-end tuning reads depends on whether it runs
        config, distil_note = _with_distillation(config, lm)
        if distil_note:
            say(distil_note)
        data = _load_data(config, lm)
    config, kv_note = _with_kv_cache(config, lm)
    example = lm.example_inputs(batch=2, seq=8)
    qm = api.quantize(lm.module, example, data.calib, config.quantize, progress=say,
                      checkpoint_dir=work, tune_batches=data.tune)
    if context_note:
        qm.notes["context"] = [context_note]
    if distil_note:
        qm.notes["distillation"] = [distil_note]
    if kv_note:
        qm.notes["kv_cache"] = [kv_note]
    timings.update(qm.timings)

    with stage("exporting to ONNX"):
        files, runtime_files = _export(config, lm, qm, target, tmp, say, timings)
    with stage("checking the export"):
        checks = _check(config, lm, qm, data, tmp, say, timings)
    with stage("writing the report"):
        return _report(config, target, lm, qm, data, files, runtime_files, checks, tmp, say,
                       timings)


def idle_cores(sample_s: float = 0.2) -> int:
    """How many cores are idle now (at least 1): the default thread count. On a machine busy
    with other work, torch's default (every core) makes each of the many small parallel
    regions of calibration and learning wait for a thread that shares its core, for a
    scheduler time slice each: a 2-block toy model took 123 s with 2 threads against 18 s with
    1 while one core ran something else (docs/performance.md). Measured from /proc/stat over
    `sample_s`; where that is not available, every core."""
    cores = os.cpu_count() or 1

    def idle_and_total():
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return values[3] + values[4], sum(values[:8])  # idle + iowait, all but guest time

    try:
        idle0, total0 = idle_and_total()
        time.sleep(sample_s)
        idle1, total1 = idle_and_total()
    except (OSError, ValueError, IndexError):
        return cores
    if total1 <= total0:
        return cores
    return max(1, min(cores, round(cores * (idle1 - idle0) / (total1 - total0))))


def _for_target(config: RunConfig, target: targets.Target):
    """The QuantizeConfig with the target's attention default, or a QexportError before any
    work for what the target's runtime cannot run."""
    qconfig = dataclasses.replace(config.quantize)
    if qconfig.fused_attention is None:
        qconfig.fused_attention = target.contrib_ops
    if qconfig.fused_attention and not target.contrib_ops:
        raise QexportError(f"--fused-attention exports ONNX Runtime's GroupQueryAttention, "
                           f"which --target {target.name} cannot run")
    if config.kv_cache and not qconfig.fused_attention:
        raise QexportError("--kv-cache needs the fused attention (not with "
                           f"--no-fused-attention or --target {target.name})")
    qconfig.standard_ops = qconfig.standard_ops or target.standard_ops
    qconfig.validate()  # e.g. a binary scheme for a library-free target
    return qconfig


def _with_kv_cache(config: RunConfig, lm) -> tuple[RunConfig, str | None]:
    """The config with kv_cache decided (None: on for a causal LM whose family has a KV-cache
    decoder, with fused attention), and a note on why it is off; a QexportError where
    --kv-cache was asked for and cannot be."""
    from . import api

    reason = api.kv_cache_unsupported(lm.module)
    if config.kv_cache:
        if reason:
            raise QexportError(f"--kv-cache: {reason}")
        return config, None
    if config.kv_cache is False:
        return config, None
    if not lm.is_causal_lm:
        reason = "the model is not a causal language model"
    elif not config.quantize.fused_attention:
        reason = "the attention is not fused (--no-fused-attention or the target's default)"
    note = f"no model_with_past.onnx: {reason}" if reason else None
    return dataclasses.replace(config, kv_cache=reason is None), note


def _with_distillation(config: RunConfig, lm) -> tuple[RunConfig, str | None]:
    """Restorative LoRA and end-to-end tuning distil the fp model's next-token distributions:
    off, with a note, for a model without a language-model head (an encoder)."""
    q = config.quantize
    if lm.is_causal_lm or (q.e2e is None and q.preprocess is None):
        return config, None
    stages = [name for name, on in (("restorative LoRA", q.preprocess is not None),
                                    ("end-to-end tuning", q.e2e is not None)) if on]
    note = (f"{' and '.join(stages)} skipped: they distil next-token distributions, and the "
            "model has no language-model head")
    return dataclasses.replace(config, quantize=dataclasses.replace(q, e2e=None,
                                                                    preprocess=None)), note


def _within_context(config: RunConfig, module) -> tuple[RunConfig, str | None]:
    """The config with calibration and evaluation lengths cut to the model's context (its
    position table), and a note saying so; unchanged where they fit."""
    from . import families

    limit = families.detect(module).max_context(module)
    if not limit or (config.calib_seqlen <= limit and config.eval_window <= limit):
        return config, None
    cut = dataclasses.replace(config, calib_seqlen=min(config.calib_seqlen, limit),
                              eval_window=min(config.eval_window, limit))
    return cut, (f"the model takes at most {limit} tokens: calibration sequences of "
                 f"{cut.calib_seqlen} and evaluation windows of {cut.eval_window} tokens")


def _sequences(config: RunConfig) -> int:
    """Sequences of calibration text to draw: the calibration rows, or as many as end-to-end
    tuning reads per epoch where that is more (config.E2EConfig.n_samples)."""
    e2e = config.quantize.e2e
    return max(config.calib_samples, (e2e.n_samples or 0) if e2e is not None else 0)


def _calib_and_tune(config: RunConfig, rows) -> tuple[list, list | None]:
    """(calibration batches: the first calib_samples rows, end-to-end tuning's: all the rows
    where there are more, else None)."""
    batches = [(b.unsqueeze(0),) for b in rows]
    return batches[:config.calib_samples], (batches if len(batches) > config.calib_samples
                                            else None)


def _tuning_sequences(config: RunConfig, qm, data: _Data) -> dict:
    """{"end_to_end": distinct sequences end-to-end tuning read and per epoch} where it ran
    (the rest repeated: a short text), else {}."""
    e2e = config.quantize.e2e
    if e2e is None or "e2e_tune" not in qm.timings:
        return {}
    have = len(data.tune or data.calib)
    per_epoch = e2e.n_samples or have
    return {"end_to_end": {"sequences": min(have, per_epoch), "per_epoch": per_epoch}}


def _load_data(config: RunConfig, lm) -> _Data:
    """Calibration batches and held-out tokens: text through the model's tokenizer, or random
    tokens for a model without one."""
    from . import data

    if lm.tokenizer is None:
        if config.calib:
            raise QexportError(f"{config.model} has no tokenizer, so --calib text cannot be "
                               "used; omit it to calibrate on random tokens")
        if not lm.vocab_size:
            raise QexportError(f"cannot calibrate {config.model}: no tokenizer and unknown "
                               "vocabulary")
        rows = data.random_token_batches(lm.vocab_size, _sequences(config),
                                         config.calib_seqlen)
        calib, tune = _calib_and_tune(config, rows)
        return _Data(calib, f"random tokens (the model has no tokenizer), vocabulary "
                     f"{lm.vocab_size}", tune=tune, ppl_skipped="the model has no tokenizer")
    held_out = None
    if config.calib:
        calib_text, calib_source = data.load_text(config.calib), config.calib
    else:
        calib_text, held_out = data.brown_splits()
        calib_source = "Brown corpus (characters 0 to 3,000,000)"
    rows = data.calibration_batches(lm.tokenizer, calib_text, _sequences(config),
                                    config.calib_seqlen, required=config.calib_samples)
    calib, tune = _calib_and_tune(config, rows)
    out = _Data(calib, calib_source, tune=tune)
    if config.eval_text:
        text, out.eval_source = data.load_text(config.eval_text), config.eval_text
    else:  # read once: calibration may have split Brown already
        text = held_out if held_out is not None else data.brown_splits()[1]
        out.eval_source = "Brown corpus from character 3,000,000 (held out)"
    if not config.perplexity:
        out.ppl_skipped = "--no-perplexity"
    elif not lm.is_causal_lm:
        out.ppl_skipped = "the model has no language-model head"
    else:
        out.eval_ids = data.eval_tokens(lm.tokenizer, text, config.eval_tokens)
    if out.eval_ids is None:
        try:
            out.parity_ids = data.eval_tokens(lm.tokenizer, text, 2 * PARITY_TOKENS)
        except QexportError:  # a short text: the parity check takes random tokens
            pass
    return out


def _export(config: RunConfig, lm, qm, target: targets.Target, tmp: Path, say: Progress,
            timings: dict) -> tuple[list[Path], list[Path]]:
    """model.onnx (+ model_with_past.onnx) and the target's runtime files, into tmp."""
    from . import api

    say("exporting to ONNX")
    onnx_path = tmp / "model.onnx"
    extra = {META_SOURCE: str(config.model)}
    if lm.vocab_size:
        extra[META_VOCAB_SIZE] = str(lm.vocab_size)
    files = api.export(qm, onnx_path, extra, input_names=["input_ids"],
                       output_names=output_names(lm, qm.example_inputs))
    timings["export"] = qm.timings["export"]
    if config.kv_cache:
        say("exporting the KV-cache decoder (model_with_past.onnx)")
        t0 = time.perf_counter()
        files += api.export_with_past(lm.module, qm, tmp / "model_with_past.onnx", extra,
                                      share_data_with=onnx_path)
        timings["export_with_past"] = time.perf_counter() - t0
        files += _serving_files(lm, tmp)
    return files, target.runtime_files(tmp)


def _serving_files(lm, tmp: Path) -> list[Path]:
    """Beside the KV-cache decoder, what generating needs from the folder alone (`qexport
    generate`, onnxruntime-genai): the tokenizer and its chat template, generation_config.json
    and genai_config.json."""
    from . import families, serving

    files = []
    if lm.tokenizer is not None:
        files += serving.write_tokenizer(lm.tokenizer, lm.hf_model, tmp)
    files.append(serving.write_genai_config(
        tmp, lm.config, families.detect(lm.module).max_context(lm.module)))
    return files


def _check(config: RunConfig, lm, qm, data: _Data, tmp: Path, say: Progress,
           timings: dict) -> dict:
    """Parity (ONNX Runtime vs the PyTorch quantized graph, end to end, per layer and through
    the KV-cache decoder), quantization error, speed and perplexity; writes reference.npz."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from . import check, evaluate, native
    from .data import random_token_batches

    t0 = time.perf_counter()
    say("checking parity: ONNX Runtime vs PyTorch reference")
    session = native.make_session(tmp / "model.onnx", threads=config.threads)
    n = min(PARITY_TOKENS, config.eval_window)  # within the model's context (_within_context)
    held = data.eval_ids if data.eval_ids is not None else data.parity_ids
    if held is not None and held.numel() >= 2 * n:
        parity_ids, parity_desc = held[:2 * n].view(2, n), f"2×{n} held-out tokens"
    else:
        n = min(n, 64)
        parity_ids = random_token_batches(lm.vocab_size, 2, n, seed=1)
        parity_desc = f"2×{n} random tokens"
    e2e, ref_logits = _compare_outputs(lm, qm, session, parity_ids)
    e2e["inputs"] = parity_desc
    # A small reference for the samples (full logits of the parity batch would be ~50 MB):
    # `logits` is the first output, whatever the model calls it.
    sample_ids = parity_ids[:1, :16].contiguous()
    with torch.no_grad():
        sample = tensor_outputs(qm.graph_module(sample_ids))
    np.savez(tmp / "reference.npz", input_ids=sample_ids.numpy(), logits=sample[0].numpy(),
             **{f"output_{i}": t.numpy() for i, t in enumerate(sample[1:], start=1)})
    past_session = None
    if config.kv_cache:
        say("checking the KV-cache decoder: prompt, then 8 tokens one at a time")
        n = parity_ids.shape[1]
        past_session = native.make_session(tmp / "model_with_past.onnx", threads=config.threads)
        kv_logits = check.decode_with_past(past_session, parity_ids[:1].numpy(), n - 8)
        e2e["kv_cache"] = {"inputs": f"the first row: {n - 8} tokens, then 8 decoded one by "
                                     "one, the cache updated in place (the logits of the "
                                     "prompt's last token and of each)",
                           "parity": check.compare(kv_logits, ref_logits[:1, n - 9:],
                                                   top1=True)}
    layer_inputs = check.op_inputs(qm.graph_module, (parity_ids[:1, :32],))

    def layer_session(model_bytes):
        return ort.InferenceSession(model_bytes, sess_options=native.session_options(),
                                    providers=["CPUExecutionProvider"])
    layers = check.layer_report(qm.packed, qm.fp_weights, layer_inputs, layer_session)
    timings["check"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    say("timing: ONNX Runtime vs PyTorch fp32")
    speed = check.speed(session, lm.module, parity_ids[:1].contiguous(), past_session)
    timings["speed"] = time.perf_counter() - t0
    ppl = None
    if data.eval_ids is not None:
        t0 = time.perf_counter()
        ppl = evaluate.perplexities(data.eval_ids, config.eval_window, data.eval_source, say,
                                    fp=lm.module, quantized_torch=qm.graph_module,
                                    quantized_ort=session)
        timings["perplexity"] = time.perf_counter() - t0
    # Activation quantization rounds: a value within float rounding of a step boundary lands
    # on either side in two correct implementations (ONNX Runtime's integer kernels, PyTorch's
    # float reference), a step being 1/63 of the range at 6 bits. There each layer must be
    # exact (per-layer parity, same inputs) and the outputs no further from fp than the
    # reference's (docs/design.md).
    rounding = any(getattr(w, "rounds_activations", False) for w in qm.packed.values())
    if rounding and "kv_cache" in e2e:
        with torch.no_grad():
            fp = tensor_outputs(lm.module(parity_ids[:1]))[0][:, n - 9:]
        e2e["kv_cache"]["ort_vs_fp"] = check.compare(kv_logits, fp, top1=True)
        e2e["kv_cache"]["quant_error"] = check.compare(ref_logits[:1, n - 9:], fp, top1=True)

    def ok(m: dict) -> bool:
        return check.parity_ok(m["parity"]) or rounding and 1 - m["ort_vs_fp"]["cosine"] <= \
            ROUNDING_SLACK * (1 - m["quant_error"]["cosine"]) + (1 - check.PARITY_MIN_COSINE)

    layers_ok = all(row.get("parity", {}).get("ok", True) for row in layers)
    parity_ok = layers_ok and all(map(ok, e2e["outputs"].values())) and \
        ok(e2e.get("kv_cache", e2e["outputs"][next(iter(e2e["outputs"]))]))
    if rounding:
        e2e["parity_rule"] = (
            "activation quantization: every layer exact on the same inputs, and end to end "
            f"ORT's distance from fp (1 - cosine) at most {ROUNDING_SLACK:g}× the PyTorch "
            f"reference's + {1 - check.PARITY_MIN_COSINE:g} (rounding flips differ between "
            "two correct implementations, docs/design.md)")
    return {"end_to_end": e2e, "layers": layers, "speed": speed, "perplexity": ppl,
            "parity_ok": parity_ok}


def tensor_outputs(out) -> list:
    """The tensors of a model's output (a tensor, a tuple, a Hugging Face ModelOutput), in the
    order torch.export flattens them (= the ONNX outputs)."""
    import torch

    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def output_names(lm, example: tuple) -> list[str]:
    """ONNX output names: `logits` for a causal LM; else the model's own names (a
    ModelOutput's fields, e.g. last_hidden_state, pooler_output), or output_<i>."""
    import torch

    if lm.is_causal_lm:
        return ["logits"]
    with torch.no_grad():
        out = lm.module(*example)
    if isinstance(out, dict):  # ModelOutput is an OrderedDict of its non-None fields
        names = [k for k, v in out.items() if isinstance(v, torch.Tensor)]
        if len(names) == len(tensor_outputs(out)):
            return names
    n = len(tensor_outputs(out))
    return ["logits"] if n == 1 and lm.vocab_size else [f"output_{i}" for i in range(n)]


def _compare_outputs(lm, qm, session, ids) -> tuple[dict, object]:
    """Per output: ORT vs the PyTorch quantized graph (parity), the latter vs fp
    (quantization error) and ORT vs fp; top-1 agreement for an LM's logits. The first
    output's metrics are also the top level of the result. Returns it and the reference's
    first output."""
    import torch

    from . import check

    with torch.no_grad():
        fp, ref = tensor_outputs(lm.module(ids)), tensor_outputs(qm.graph_module(ids))
    got = session.run(None, {session.get_inputs()[0].name: ids.numpy()})
    names = [o.name for o in session.get_outputs()]
    if not len(fp) == len(ref) == len(got) == len(names):
        raise QexportError(f"the export has {len(got)} outputs, the model {len(fp)}")
    top1 = bool(lm.vocab_size) and names[0] == "logits"
    outputs = {}
    for name, f, r, g in zip(names, fp, ref, got):
        is_logits = top1 and name == "logits"
        outputs[name] = {"parity": check.compare(g, r, top1=is_logits),
                         "quant_error": check.compare(r, f, top1=is_logits),
                         "ort_vs_fp": check.compare(g, f, top1=is_logits)}
    result = {**outputs[names[0]], "outputs": outputs}
    if not lm.is_causal_lm and "last_hidden_state" in names:
        result["pooled_embedding"] = _pooled_embedding(lm, *(
            x[names.index("last_hidden_state")] for x in (fp, ref, got)))
    return result, ref[0]


def _pooled_embedding(lm, fp, ref, got) -> dict:
    """An encoder's sentence embedding (its sentence-transformers pooling, else the mean over
    tokens) compared row by row: ORT and PyTorch quantized against fp, ORT against PyTorch
    quantized. Cosines per row, the smallest reported."""
    from . import check

    modes = lm.pooling or ("mean_tokens",)
    fp, ref, got = (check.pool(x, modes) for x in (fp, ref, got))
    pairs = {"ort_vs_fp": (got, fp), "quant_vs_fp": (ref, fp), "parity": (got, ref)}
    rows = {k: check.row_cosines(a, b) for k, (a, b) in pairs.items()}
    return {"pooling": "+".join(modes),
            "source": "the model's sentence-transformers Pooling config" if lm.pooling else
                      "no pooling config: the mean over tokens",
            **{f"{k}_min_cosine": min(v) for k, v in rows.items()},
            "ort_vs_fp_cosines": rows["ort_vs_fp"]}


def _report(config: RunConfig, target: targets.Target, lm, qm, data: _Data, files: list[Path],
            runtime_files: list[Path], checks: dict, tmp: Path, say: Progress,
            timings: dict) -> dict:
    """report.json and report.md into tmp; returns the report."""
    from . import __version__, check, native, report

    qconfig = qm.config
    n_params = sum(p.numel() for p in {id(p): p for p in lm.module.parameters()}.values())
    onnx_bytes = sum(f.stat().st_size for f in files)
    e2e, ppl = checks["end_to_end"], checks["perplexity"]
    rep = {
        "qexport_version": __version__, "scheme": qconfig.scheme.label,
        "config": qconfig.as_dict(), "target": target.name, "family": qm.family,
        "model": {"name": lm.name, "source": str(config.model), "kind": lm.kind,
                  "parameters": n_params},
        "calibration": {"source": data.calib_source, "samples": config.calib_samples,
                        "seq_len": config.calib_seqlen, **_tuning_sequences(config, qm, data)},
        "files": [f.name for f in files + runtime_files] + ["reference.npz"],
        # whether the folder needs the qexport op library (False: ONNX Runtime's own ops)
        "op_library": any(f.name == native.LIBRARY_NAME for f in runtime_files),
        "bits": report.bits_summary(checks["layers"], qm.packed, head=qconfig.is_head),
        "size": {"onnx_bytes": onnx_bytes, "fp32_bytes": 4 * n_params,
                 "fp16_bytes": 2 * n_params},
        "parity": {"ok": checks["parity_ok"], "min_cosine": check.PARITY_MIN_COSINE,
                   "min_top1": check.PARITY_MIN_TOP1},
        "end_to_end": e2e, "speed": checks["speed"], "layers": checks["layers"],
        "perplexity": ppl, "perplexity_skipped": data.ppl_skipped, "timings": timings,
        "notes": qm.notes,
    }
    report.write(rep, tmp)
    say(f"bits/weight {rep['bits']['bits_per_weight']:.3f}; parity cosine "
        f"{e2e['parity']['cosine']:.6f}"
        + (f", top-1 {e2e['parity']['top1_agreement']:.4f}" if "top1_agreement" in e2e["parity"]
           else "")
        + (f"; perplexity fp {ppl['fp']:.2f} -> quantized {ppl['quantized_ort']:.2f}"
           if ppl else ""))
    return rep


EVAL_TOKENS = 20000  # `qexport eval`'s held-out tokens (more than a run's report uses)
EVAL_AGREEMENT = 0.005  # PyTorch quantized vs ORT perplexity: a larger gap is a bug


def evaluate_export(output: str | Path, model: str | None = None, trust_pickle: bool = False,
                    eval_text: str | None = None, eval_tokens: int = EVAL_TOKENS,
                    eval_window: int | None = None, threads: int | None = None,
                    progress: Progress | None = None) -> dict:
    """`qexport eval OUT`: perplexity of the fp model, of the PyTorch quantized model rebuilt
    from the export's packed weights (per layer, unstacked: the reference need not match the
    file's node layout) and of the file through ONNX Runtime; with "gap" (relative, ORT vs
    PyTorch quantized) and "agree" (gap within EVAL_AGREEMENT)."""
    import torch

    from . import data, evaluate, models, native
    from .api import rebuild
    from .artifact import export_config, read_export
    from .config import QuantizeConfig, RunConfig, default

    say = progress or (lambda msg: None)
    if threads:
        torch.set_num_threads(threads)
    onnx_path = Path(output) / "model.onnx"
    packed, meta, folded = read_export(onnx_path)
    config = export_config(meta)
    source = model or meta.get(META_SOURCE)
    if not source:
        raise QexportError(f"{onnx_path} does not record its model: pass --model")
    lm = models.load_model(source, trust_pickle=trust_pickle)
    if lm.tokenizer is None:
        raise QexportError(f"{source} has no tokenizer: perplexity needs one")
    if eval_text:
        text, text_source = data.load_text(eval_text), eval_text
    else:
        text, text_source = data.brown_splits()[1], "Brown corpus from character 3,000,000"
    eval_ids = data.eval_tokens(lm.tokenizer, text, eval_tokens)
    say(f"rebuilding the PyTorch quantized model from {len(packed)} packed layers"
        + (f" and {len(folded)} replaced tensors (OS+ folds, tuned norm weights)" if folded
           else ""))
    passes_config = QuantizeConfig(embeddings_fp16=bool(config.get("embeddings_fp16")),
                                   fused_attention=config.get("fused_attention"))
    candidates = {
        "fp": lm.module,
        "quantized_torch": rebuild(lm.module, lm.module, lm.example_inputs(batch=2, seq=8),
                                   packed, folded, passes_config, stack=False),
        "quantized_ort": native.make_session(onnx_path, threads=threads)}
    window = eval_window or default(RunConfig, "eval_window")
    ppl = evaluate.perplexities(eval_ids, window, text_source, say, **candidates)
    ppl["gap"] = abs(ppl["quantized_ort"] / ppl["quantized_torch"] - 1)
    ppl["agree"] = ppl["gap"] <= EVAL_AGREEMENT
    return ppl


def _prepare_output(path: Path, force: bool) -> Path:
    """Check the output folder can be (re)written; return a temp folder beside it."""
    if path.exists():
        if not path.is_dir():
            raise QexportError(f"output {path} exists and is not a folder")
        ours = (path / "report.json").exists() or not any(path.iterdir())
        if not ours and not force:
            raise QexportError(f"output folder {path} exists and was not written by qexport; "
                               "use --force to replace it")
    parent = path.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(parent, path.name)
        return Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{_owner_tag()}-", dir=parent))
    except OSError as e:
        raise QexportError(f"cannot write the output folder {path}: {e.strerror}") from e


def _owner_tag() -> str:
    """host-pid, in the names of a run's temp folders: another run can tell whether their
    process is gone (a process id alone says nothing across hosts of a shared file system)."""
    import socket

    return f"{socket.gethostname().replace('-', '_')}-{os.getpid()}"


def _dead(tag: str) -> bool:
    """Whether the run of a temp folder's host-pid tag is gone (only decidable on this host)."""
    import socket

    host, _, pid = tag.rpartition("-")
    if host != socket.gethostname().replace("-", "_") or not pid.isdigit() or \
            int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:
        pass  # alive (another user's process)
    return False


def _remove_stale_temps(parent: Path, name: str) -> None:
    """Leftovers of runs killed outright (SIGKILL: no cleanup ran), told from those of runs
    still going by the host and process id in their names: a temp folder is removed; the
    previous output set aside during a commit is put back if the new one never arrived."""
    import re

    for p in parent.glob(f".{name}.*-*"):
        m = re.fullmatch(rf"\.{re.escape(name)}\.(tmp|old)-([^-]+-\d+)(-.*)?", p.name)
        if m is None or not _dead(m[2]):
            continue
        if m[1] == "old" and not (parent / name).exists():
            p.rename(parent / name)
        else:
            shutil.rmtree(p, ignore_errors=True)


class _signals_deferred:
    """SIGINT and SIGTERM held back for the duration (delivered at exit), where the platform
    allows it (the main thread on POSIX): the two renames of a commit are not split."""

    def __enter__(self):
        import signal
        import threading

        self.mask = None
        if hasattr(signal, "pthread_sigmask") and \
                threading.current_thread() is threading.main_thread():
            self.mask = signal.pthread_sigmask(signal.SIG_BLOCK,
                                               {signal.SIGINT, signal.SIGTERM})
        return self

    def __exit__(self, *exc):
        import signal

        if self.mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, self.mask)


def _commit_output(tmp: Path, path: Path) -> None:
    """tmp becomes path; a previous path is set aside first and put back on any failure."""
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{_owner_tag()}")
        path.rename(old)
    try:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp made it private
        tmp.rename(path)
    except BaseException:
        if old is not None and not path.exists():
            old.rename(path)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
