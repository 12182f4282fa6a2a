"""`qexport MODEL --scheme w1.61a16 -o out/`: quantize, export to ONNX, check, report.

User mistakes end with one line `qexport: error: ...` and exit code 2; a failed parity check
(a bug, not a user mistake) writes the report and exits with code 3; `--target trt` where
TensorRT or a GPU is missing writes the ONNX outputs, says what is missing, and exits with 4.
`qexport build-engine out/model.onnx` builds (and checks) the engine of an earlier export;
`qexport eval out/` reports fp, PyTorch-quantized and ONNX Runtime perplexity of an export.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

EXIT_USAGE = 2
EXIT_PARITY = 3
EXIT_TARGET_UNAVAILABLE = 4  # outputs written, but the requested TensorRT engine not built


def _log(msg: str) -> None:
    print(f"qexport: {msg}", file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    from .schemes import SCHEMES
    p = argparse.ArgumentParser(
        prog="qexport",
        description="Quantize a PyTorch transformer to ~1.61 bits/weight and export it to ONNX "
                    "with qexport custom ops, a compiled op library and a parity report.",
        epilog="Other commands: `qexport eval OUT_DIR` (perplexity of an export: fp, PyTorch "
               "quantized, ONNX Runtime); `qexport build-engine OUT_DIR/model.onnx` (TensorRT "
               "engine). Each takes --help.")
    p.add_argument("model", help="Hugging Face model folder, torch.export .pt2, pickled nn.Module "
                   "(.pt, with --trust-pickle), or the built-in example 'smollm2-135m'")
    p.add_argument("--scheme", default="w1.61a16",
                   help=f"quantization scheme: {', '.join(SCHEMES)} (NAME-gGROUP sets the 4-bit "
                        "group size) [default: %(default)s]")
    p.add_argument("-o", "--output", default="out", help="output folder [default: %(default)s]")
    p.add_argument("--target", choices=("ort", "trt"), default="ort",
                   help="ort: ONNX + op library; trt: also a TensorRT engine (needs TensorRT and "
                        "a GPU) [default: %(default)s]")
    p.add_argument("--fused-attention", action=argparse.BooleanOptionalAction, default=None,
                   help="export each Llama attention block as one ONNX Runtime "
                        "GroupQueryAttention node (com.microsoft), not ~30 small ones "
                        "[default: on, off with --target trt, whose parser lacks it]")
    p.add_argument("--kv-cache", action="store_true",
                   help="also write model_with_past.onnx, a decoder with a KV cache for "
                        "generation (input_ids, attention_mask, past/present keys and values per "
                        "layer, which may be one buffer updated in place: docs/format.md); shares "
                        "model.onnx's weight file (Llama, Mistral, Qwen2)")
    p.add_argument("--force", action="store_true",
                   help="replace an output folder that was not written by qexport")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow loading a pickled module (unpickling runs code from the file)")
    g = p.add_argument_group("calibration and evaluation")
    g.add_argument("--calib", metavar="PATH", help="calibration text: .txt, .jsonl or a folder "
                   "[default: the Brown corpus for models with a tokenizer, random tokens otherwise]")
    g.add_argument("--calib-samples", type=int, default=64, help="[default: %(default)s]")
    g.add_argument("--calib-seqlen", type=int, default=512, help="[default: %(default)s]")
    g.add_argument("--eval", dest="eval_text", metavar="PATH",
                   help="held-out text for perplexity [default: Brown from char 3,000,000]")
    g.add_argument("--eval-tokens", type=int, default=4096, help="[default: %(default)s]")
    g.add_argument("--eval-window", type=int, default=512, help="[default: %(default)s]")
    g.add_argument("--perplexity", action=argparse.BooleanOptionalAction, default=True,
                   help="report fp and quantized perplexity [default: on]")
    q = p.add_argument_group("quantization")
    q.add_argument("--salient-ratio", type=float, help="fraction of input channels kept at 4 bits")
    q.add_argument("--method", choices=("ptq161", "closed-form"), default="ptq161",
                   help="ptq161: learn the binary scales α, r1, r2 block by block (PTQ1.61); "
                        "closed-form: α = mean|W - μ|, no learning [default: %(default)s]")
    q.add_argument("--preset", choices=("fast", "default"), default="default",
                   help="PTQ1.61 learning budget: default (every calibration sample, 2 epochs, "
                        "as in the paper) or fast (16 samples, 1 epoch) [default: %(default)s]")
    q.add_argument("--epochs", type=int, help="PTQ1.61 epochs per block [default: the preset's]")
    q.add_argument("--lr", type=float, help="PTQ1.61 learning rate of α, r1 and r2 "
                   "[default: the preset's]")
    q.add_argument("--share-r2", action="store_true",
                   help="PTQ1.61: learn one r2 per input activation instead of one per Linear, "
                        "so that q/k/v and gate/up stack into one op each: faster decoding "
                        "(8-26%% less time per token on SmolLM2), slightly higher perplexity "
                        "(~3%%)")
    q.add_argument("--outlier-suppression", action=argparse.BooleanOptionalAction, default=False,
                   help="fold OS+ shift/scale into norms and Linears before quantizing (and "
                        "before PTQ1.61 learning); t is searched to minimise the quantization "
                        "error of each norm's Linears [default: off]")
    q.add_argument("--os-grid", type=int, default=20,
                   help="candidates of t in the OS+ search [default: %(default)s]")
    q.add_argument("--os-quantile", type=float, default=None,
                   help="no OS+ search: t = this quantile of the channels' half-ranges")
    q.add_argument("--skip", help="regex of Linear names that get --head-scheme instead of "
                   "--scheme [default: the output head]")
    q.add_argument("--head-scheme", default="w4a16",
                   help="scheme of the --skip Linears (the output head); an all-4-bit one gets "
                        "GPTQ codes; 'none' keeps them in floating point (~1.5%% lower "
                        "perplexity on SmolLM2, 1.4x the file, slower tokens) "
                        "[default: %(default)s]")
    q.add_argument("--embeddings-fp16", action=argparse.BooleanOptionalAction, default=True,
                   help="store embedding tables in fp16 (halves the largest fp tensor) "
                        "[default: on]")
    p.add_argument("--threads", type=int, default=None, help="CPU threads [default: all cores]")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress messages")
    return p


def build_engine_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qexport build-engine",
                                description="Build a TensorRT engine from an exported model.onnx "
                                            "and check it against the export's reference.")
    p.add_argument("onnx", help="model.onnx written by qexport")
    p.add_argument("-o", "--output", help="engine file [default: model.engine beside the model]")
    p.add_argument("--fp16", action=argparse.BooleanOptionalAction, default=True,
                   help="allow fp16 kernels [default: on]")
    return p


def build_engine_main(args) -> int:
    from . import check, trt
    from .errors import QexportError
    onnx_path = Path(args.onnx)
    if not onnx_path.is_file():
        raise QexportError(f"no such file: {onnx_path}")
    trt.check_parsable(onnx_path)
    reason = trt.engine_prerequisites()
    if reason:
        print(f"qexport: error: cannot build a TensorRT engine: {reason}", file=sys.stderr)
        return EXIT_TARGET_UNAVAILABLE
    engine = Path(args.output) if args.output else onnx_path.with_suffix(".engine")
    metrics = trt.build_and_check(onnx_path, engine, fp16=args.fp16)
    _log(f"wrote {engine}")
    if metrics:
        _log(f"TensorRT vs PyTorch reference: cosine {metrics['cosine']:.6f}, "
             f"top-1 {metrics['top1_agreement']:.4f}")
        if not check.parity_ok(metrics):
            print("qexport: error: TensorRT parity check failed", file=sys.stderr)
            return EXIT_PARITY
    return 0


def main(argv: list[str] | None = None) -> int:
    from .errors import QexportError
    argv = sys.argv[1:] if argv is None else argv
    sub = argv[0] if argv else None
    try:
        if sub == "build-engine":
            return build_engine_main(build_engine_parser().parse_args(argv[1:]))
        if sub == "eval":
            return eval_main(build_eval_parser().parse_args(argv[1:]))
        return run(build_parser().parse_args(argv))
    except QexportError as e:
        print(f"qexport: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("qexport: interrupted; nothing was written", file=sys.stderr)
        return 130


def _prepare_output(path: Path, force: bool) -> Path:
    """Check the output folder can be (re)written; return a temp folder beside it."""
    from .errors import QexportError
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
        return Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=parent))
    except OSError as e:
        raise QexportError(f"cannot write the output folder {path}: {e.strerror}") from e


def _commit_output(tmp: Path, path: Path) -> None:
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        path.rename(old)
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp made it private
    tmp.rename(path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def run(args) -> int:
    from .errors import QexportError
    from .schemes import parse_scheme

    say = (lambda msg: None) if args.quiet else _log
    scheme = parse_scheme(args.scheme).with_overrides(args.salient_ratio)
    args.head = None if args.head_scheme.strip().lower() in ("none", "fp") \
        else parse_scheme(args.head_scheme)
    for name in ("calib_samples", "calib_seqlen", "eval_tokens", "eval_window", "os_grid"):
        if getattr(args, name) < 1:
            raise QexportError(f"--{name.replace('_', '-')} must be at least 1")
    if args.epochs is not None and args.epochs < 1:
        raise QexportError("--epochs must be at least 1")
    if args.lr is not None and not args.lr > 0:
        raise QexportError(f"--lr must be positive, got {args.lr}")
    if args.os_quantile is not None and not 0.0 < args.os_quantile <= 1.0:
        raise QexportError(f"--os-quantile must be within (0, 1], got {args.os_quantile}")
    out = Path(args.output)
    tmp = _prepare_output(out, args.force)
    try:
        code = _run_into(args, scheme, tmp, out, say)
        _commit_output(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if code == EXIT_PARITY:
        print(f"qexport: error: parity check failed (ORT disagrees with the PyTorch reference); "
              f"see {out / 'report.md'}", file=sys.stderr)
        return code
    say(f"wrote {out}/ (model.onnx, op library, report.md)")
    if args.target == "trt":
        from . import trt
        reason = trt.engine_prerequisites()
        if reason:
            print(f"qexport: error: no TensorRT engine built: {reason}; the ONNX and ONNX Runtime "
                  f"outputs in {out}/ are complete", file=sys.stderr)
            return EXIT_TARGET_UNAVAILABLE
        return build_engine_main(argparse.Namespace(onnx=str(out / "model.onnx"), output=None,
                                                    fp16=True))
    return code


def _run_into(args, scheme, tmp: Path, out: Path, say) -> int:
    import torch

    from . import __version__, api, check, data, models, native, report
    from .errors import QexportError
    from .ptq161 import LearnConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    say(f"loading {args.model}")
    lm = models.load_model(args.model, trust_pickle=args.trust_pickle)
    timings["load"] = time.perf_counter() - t0

    # Calibration / evaluation tokens.
    eval_ids, eval_source, ppl_skipped, held_out = None, None, None, None
    if lm.tokenizer is not None:
        if args.calib:
            calib_text, calib_source = data.load_text(args.calib), args.calib
        else:
            calib_text, held_out = data.brown_splits()
            calib_source = "Brown corpus (characters 0 to 3,000,000)"
        calib = data.calibration_batches(lm.tokenizer, calib_text, args.calib_samples,
                                         args.calib_seqlen)
        if args.perplexity:
            if args.eval_text:
                eval_ids = data.eval_tokens(lm.tokenizer, data.load_text(args.eval_text),
                                            args.eval_tokens)
                eval_source = args.eval_text
            else:
                if held_out is None:  # read once: calibration may have split Brown already
                    held_out = data.brown_splits()[1]
                eval_ids = data.eval_tokens(lm.tokenizer, held_out, args.eval_tokens)
                eval_source = "Brown corpus from character 3,000,000 (held out)"
        else:
            ppl_skipped = "--no-perplexity"
    else:
        if args.calib:
            raise QexportError(f"{args.model} has no tokenizer, so --calib text cannot be used; "
                               "omit it to calibrate on random tokens")
        if not lm.vocab_size:
            raise QexportError(f"cannot calibrate {args.model}: no tokenizer and unknown vocabulary")
        calib = data.random_token_batches(lm.vocab_size, args.calib_samples, args.calib_seqlen)
        calib_source = f"random tokens (the model has no tokenizer), vocabulary {lm.vocab_size}"
        ppl_skipped = "the model has no tokenizer"

    example = lm.example_inputs(batch=2, seq=8)
    if args.kv_cache:
        if args.fused_attention is False or args.target == "trt":
            raise QexportError("--kv-cache needs the fused attention (not with "
                               "--no-fused-attention or --target trt)")
        reason = api.kv_cache_unsupported(lm.module)
        if reason:
            raise QexportError(f"--kv-cache: {reason}")
    learn_overrides = {k: v for k, v in (("epochs", args.epochs), ("lr_alpha", args.lr),
                                         ("lr_r1", args.lr), ("lr_r2", args.lr)) if v is not None}
    if args.share_r2:
        learn_overrides["share_r2"] = True
    config = api.QuantizeConfig(
        scheme=scheme, outlier_suppression=args.outlier_suppression,
        os_quantile=args.os_quantile, os_grid=args.os_grid,
        head_scheme=args.head, embeddings_fp16=args.embeddings_fp16, method=args.method,
        fused_attention=args.target != "trt" if args.fused_attention is None
        else args.fused_attention,
        learn=LearnConfig.preset(args.preset, **learn_overrides))
    if args.skip is not None:
        config.skip = args.skip
    qm = api.quantize(lm.module, example, [(b.unsqueeze(0),) for b in calib], config,
                      progress=say)
    timings.update(qm.timings)

    say("exporting to ONNX")
    onnx_path = tmp / "model.onnx"
    from .contract import META_SOURCE
    extra = {META_SOURCE: str(args.model)}
    if lm.vocab_size:
        extra["qexport.vocab_size"] = str(lm.vocab_size)
    files = api.export(qm, onnx_path, extra, input_names=["input_ids"], output_names=["logits"])
    timings["export"] = qm.timings["export"]
    past_path = tmp / "model_with_past.onnx"
    if args.kv_cache:
        say("exporting the KV-cache decoder (model_with_past.onnx)")
        t0 = time.perf_counter()
        files += api.export_with_past(lm.module, qm, past_path, extra, share_data_with=onnx_path)
        timings["export_with_past"] = time.perf_counter() - t0
    lib = native.library_path()
    shutil.copy2(lib, tmp / lib.name)

    # Checks.
    t0 = time.perf_counter()
    say("checking parity: ONNX Runtime vs PyTorch reference")
    session = native.make_session(onnx_path, threads=args.threads)
    if eval_ids is not None and eval_ids.numel() >= 256:
        parity_ids = eval_ids[:256].view(2, 128)
        parity_desc = "2×128 held-out tokens"
    else:
        parity_ids = data.random_token_batches(lm.vocab_size, 2, 64, seed=1)
        parity_desc = "2×64 random tokens"
    with torch.no_grad():
        fp_logits = lm.module(parity_ids)
        ref_logits = qm.graph_module(parity_ids)
    ort_logits = session.run(None, {session.get_inputs()[0].name: parity_ids.numpy()})[0]
    e2e = {"inputs": parity_desc,
           "parity": check.compare(ort_logits, ref_logits, top1=True),
           "quant_error": check.compare(ref_logits, fp_logits, top1=True),
           "ort_vs_fp": check.compare(ort_logits, fp_logits, top1=True)}
    # A small reference for the samples (full logits of the parity batch would be ~50 MB).
    sample_ids = parity_ids[:1, :16].contiguous()
    with torch.no_grad():
        sample_logits = qm.graph_module(sample_ids)
    import numpy as np
    np.savez(tmp / "reference.npz", input_ids=sample_ids.numpy(), logits=sample_logits.numpy())
    if args.kv_cache:
        say("checking the KV-cache decoder: prompt, then 8 tokens one at a time")
        n = parity_ids.shape[1]
        past_session = native.make_session(past_path, threads=args.threads)
        kv_logits = check.decode_with_past(past_session, parity_ids[:1].numpy(), n - 8)
        e2e["kv_cache"] = {"inputs": f"the first row: {n - 8} tokens, then 8 decoded one by "
                                     "one, the cache updated in place (the logits of the "
                                     "prompt's last token and of each)",
                           "parity": check.compare(kv_logits, ref_logits[:1, n - 9:],
                                                   top1=True)}
    layer_inputs = check.op_inputs(qm.graph_module, (parity_ids[:1, :32],))
    import onnxruntime as ort

    def layer_session(model_bytes):
        return ort.InferenceSession(model_bytes, sess_options=native.session_options(),
                                    providers=["CPUExecutionProvider"])
    layers = check.layer_report(qm.packed, qm.fp_weights, layer_inputs, layer_session)
    timings["check"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    say("timing: ONNX Runtime vs PyTorch fp32")
    speed = check.speed(session, lm.module, parity_ids[:1].contiguous(),
                        past_session if args.kv_cache else None)
    timings["speed"] = time.perf_counter() - t0

    ppl = None
    if eval_ids is not None:
        t0 = time.perf_counter()
        ppl = _perplexities(eval_ids, args.eval_window, eval_source, say, fp=lm.module,
                            quantized_torch=qm.graph_module, quantized_ort=session)
        timings["perplexity"] = time.perf_counter() - t0

    parity_ok = check.parity_ok(e2e["parity"]) and \
        check.parity_ok(e2e.get("kv_cache", e2e)["parity"]) and all(
        row.get("parity", {}).get("ok", True) for row in layers)
    n_params = sum(p.numel() for p in {id(p): p for p in lm.module.parameters()}.values())
    onnx_bytes = sum(f.stat().st_size for f in files)
    rep = {
        "qexport_version": __version__, "scheme": scheme.label, "config": config.as_dict(),
        "model": {"name": lm.name, "source": str(args.model), "kind": lm.kind,
                  "parameters": n_params},
        "calibration": {"source": calib_source, "samples": args.calib_samples,
                        "seq_len": args.calib_seqlen},
        "files": [f.name for f in files] + [lib.name, "reference.npz"],
        "bits": report.bits_summary(layers, qm.packed, head=config.is_head),
        "size": {"onnx_bytes": onnx_bytes, "fp32_bytes": 4 * n_params, "fp16_bytes": 2 * n_params},
        "parity": {"ok": parity_ok, "min_cosine": check.PARITY_MIN_COSINE,
                   "min_top1": check.PARITY_MIN_TOP1},
        "end_to_end": e2e, "speed": speed, "layers": layers, "perplexity": ppl,
        "perplexity_skipped": ppl_skipped, "timings": timings, "notes": qm.notes,
    }
    report.write(rep, tmp)
    say(f"bits/weight {rep['bits']['bits_per_weight']:.3f}; parity cosine "
        f"{e2e['parity']['cosine']:.6f}, top-1 {e2e['parity']['top1_agreement']:.4f}"
        + (f"; perplexity fp {ppl['fp']:.2f} -> quantized {ppl['quantized_ort']:.2f}"
           if ppl else ""))
    return 0 if parity_ok else EXIT_PARITY


def _perplexities(eval_ids, window: int, source: str, say, **models) -> dict:
    """Perplexity of each named model (a torch module or an ORT session) on the same tokens."""
    from . import evaluate
    window = min(window, eval_ids.numel())
    out = {"text": source, "tokens": int(eval_ids.numel()), "window": window}
    for key, m in models.items():
        fn = evaluate.ort_logits_fn(m) if hasattr(m, "get_inputs") else evaluate.torch_logits_fn(m)
        say(f"perplexity ({key}) on {eval_ids.numel()} tokens")
        out[key] = evaluate.perplexity(fn, eval_ids, window=window)
    return out


# ------------------------------------------------------------------------------------- eval
EVAL_AGREEMENT = 0.005  # PyTorch quantized vs ORT perplexity: a larger gap is a bug


def build_eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qexport eval",
        description="Perplexity of an export: the fp model, the PyTorch quantized model rebuilt "
                    "from the export's packed weights, and the ONNX file through ONNX Runtime.")
    p.add_argument("output", help="a folder written by qexport (with model.onnx)")
    p.add_argument("--model", help="the fp model [default: the one the export was made from]")
    p.add_argument("--trust-pickle", action="store_true")
    p.add_argument("--eval", dest="eval_text", metavar="PATH",
                   help="held-out text [default: Brown from char 3,000,000]")
    p.add_argument("--eval-tokens", type=int, default=20000, help="[default: %(default)s]")
    p.add_argument("--eval-window", type=int, default=512, help="[default: %(default)s]")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("-q", "--quiet", action="store_true")
    return p


def eval_main(args) -> int:
    import torch

    from . import data, models, native
    from .api import rebuild
    from .artifact import export_config, read_export
    from .contract import META_SOURCE
    from .errors import QexportError

    say = (lambda msg: None) if args.quiet else _log
    if args.threads:
        torch.set_num_threads(args.threads)
    onnx_path = Path(args.output) / "model.onnx"
    packed, meta, folded = read_export(onnx_path)
    config = export_config(meta)
    source = args.model or meta.get(META_SOURCE)
    if not source:
        raise QexportError(f"{onnx_path} does not record its model: pass --model")
    lm = models.load_model(source, trust_pickle=args.trust_pickle)
    if lm.tokenizer is None:
        raise QexportError(f"{source} has no tokenizer: perplexity needs one")
    if args.eval_text:
        text, text_source = data.load_text(args.eval_text), args.eval_text
    else:
        text, text_source = data.brown_splits()[1], "Brown corpus from character 3,000,000"
    eval_ids = data.eval_tokens(lm.tokenizer, text, args.eval_tokens)

    candidates = {"fp": lm.module}
    say(f"rebuilding the PyTorch quantized model from {len(packed)} packed layers"
        + (f" and {len(folded)} OS+-folded tensors" if folded else ""))
    # Per layer (unstacked): the PyTorch reference need not match the file's node layout.
    candidates["quantized_torch"] = rebuild(lm.module, lm.module,
                                            lm.example_inputs(batch=2, seq=8), packed, folded,
                                            bool(config.get("embeddings_fp16")), stack=False)
    candidates["quantized_ort"] = native.make_session(onnx_path, threads=args.threads)
    ppl = _perplexities(eval_ids, args.eval_window, text_source, say, **candidates)
    print(f"perplexity on {ppl['tokens']} tokens of {text_source} ({ppl['window']}-token "
          f"windows):")
    for key in ("fp", "quantized_torch", "quantized_ort"):
        print(f"  {key:16s} {ppl[key]:.3f}")
    gap = abs(ppl["quantized_ort"] / ppl["quantized_torch"] - 1)
    print(f"  ORT vs PyTorch quantized: {100 * gap:.3f}% apart "
          f"(bound {100 * EVAL_AGREEMENT:.1f}%)")
    if gap > EVAL_AGREEMENT:
        print("qexport: error: ONNX Runtime and PyTorch quantized perplexities disagree",
              file=sys.stderr)
        return EXIT_PARITY
    return 0


if __name__ == "__main__":
    sys.exit(main())
