"""`qexport MODEL --scheme w1.61a16 -o out/`: quantize, export to ONNX, check, report.

The CLI only parses arguments into a `RunConfig` (qexport/config.py, whose defaults are the
CLI's) and runs `qexport.pipeline.run`; it prints progress and maps outcomes to exit codes.
User mistakes end with one line `qexport: error: ...` and exit code 2; a failed parity check
(a bug, not a user mistake) writes the report and exits with code 3; `--target trt` where
TensorRT or a GPU is missing writes the ONNX outputs, says what is missing, and exits with 4.
`qexport build-engine out/model.onnx` builds (and checks) the engine of an earlier export;
`qexport eval out/` reports fp, PyTorch-quantized and ONNX Runtime perplexity of an export.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

EXIT_USAGE = 2
EXIT_PARITY = 3
EXIT_TARGET_UNAVAILABLE = 4  # outputs written, but the requested TensorRT engine not built


def _log(msg: str) -> None:
    print(f"qexport: {msg}", file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    from . import targets
    from .config import (AUTO, DEFAULT_SCHEME, METHODS, PRESETS, QuantizeConfig, RunConfig,
                         default)
    from .schemes import SCHEMES

    def run_default(name):
        return default(RunConfig, name)

    def q_default(name):
        return default(QuantizeConfig, name)

    p = argparse.ArgumentParser(
        prog="qexport",
        description="Quantize a PyTorch transformer to ~1.61 bits/weight and export it to ONNX "
                    "with qexport custom ops, a compiled op library and a parity report.",
        epilog="Other commands: `qexport generate OUT_DIR --prompt TEXT` and `qexport chat "
               "OUT_DIR` (text from the export's KV-cache decoder); `qexport eval OUT_DIR` "
               "(perplexity of an export: fp, PyTorch quantized, ONNX Runtime); `qexport "
               "build-engine OUT_DIR/model.onnx` (TensorRT engine); `qexport triton OUT_DIR` "
               "(a Triton Inference Server model repository). Each takes --help.")
    p.add_argument("model", help="Hugging Face model folder, torch.export .pt2, pickled nn.Module "
                   "(.pt, with --trust-pickle), or the built-in example 'smollm2-135m'")
    p.add_argument("--scheme", default=DEFAULT_SCHEME,
                   help=f"quantization scheme: {', '.join(SCHEMES)} (NAME-gGROUP sets the weight "
                        "group size; w8a8/w6a6 quantize activations too; w2a16/w8a8/w6a6 exports "
                        "need no op library) [default: %(default)s]")
    p.add_argument("-o", "--output", default=run_default("output"),
                   help="output folder [default: %(default)s]")
    p.add_argument("--target", choices=targets.names(), default=run_default("target"),
                   help="; ".join(f"{n}: {targets.get(n).help}" for n in targets.names())
                   + " [default: %(default)s]")
    p.add_argument("--fused-attention", action=argparse.BooleanOptionalAction, default=None,
                   help="export each attention block as one ONNX Runtime GroupQueryAttention "
                        "node (com.microsoft), not ~30 small ones, where the model's family "
                        "supports it (the decoders of docs/models.md), and each residual add "
                        "with the RMSNorm of its sum as one SkipSimplifiedLayerNormalization "
                        "[default: the target's: on for ort, off for trt, whose parser lacks "
                        "them]")
    p.add_argument("--kv-cache", action=argparse.BooleanOptionalAction,
                   default=run_default("kv_cache"),
                   help="also write model_with_past.onnx, a decoder with a KV cache for "
                        "generation (input_ids, attention_mask, past/present keys and values per "
                        "layer, which may be one buffer updated in place: docs/format.md; it "
                        "shares model.onnx's weight file), with the tokenizer and "
                        "genai_config.json, for `qexport generate`/`chat` and onnxruntime-genai "
                        "[default: on for a causal LM whose family has one (docs/models.md) "
                        "when the attention is fused]")
    p.add_argument("--force", action="store_true",
                   help="replace an output folder that was not written by qexport")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction,
                   default=run_default("resume"),
                   help="continue the PTQ1.61 learning of an interrupted run of the same model, "
                        "data and settings from its last finished block (kept in .OUTPUT.resume "
                        "beside the output; the result is the same as an uninterrupted run's); "
                        "--no-resume starts over [default: on]")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow loading a pickled module (unpickling runs code from the file)")
    g = p.add_argument_group("calibration and evaluation")
    g.add_argument("--calib", metavar="PATH", help="calibration text: .txt, .jsonl or a folder "
                   "[default: the Brown corpus for models with a tokenizer, random tokens otherwise]")
    for name in ("calib_samples", "calib_seqlen"):
        g.add_argument("--" + name.replace("_", "-"), type=int, default=run_default(name),
                       help="[default: %(default)s]")
    g.add_argument("--eval", dest="eval_text", metavar="PATH",
                   help="held-out text for perplexity [default: Brown from char 3,000,000]")
    for name in ("eval_tokens", "eval_window"):
        g.add_argument("--" + name.replace("_", "-"), type=int, default=run_default(name),
                       help="[default: %(default)s]")
    g.add_argument("--perplexity", action=argparse.BooleanOptionalAction,
                   default=run_default("perplexity"),
                   help="report fp and quantized perplexity [default: on]")
    q = p.add_argument_group("quantization")
    q.add_argument("--salient-ratio", type=float, help="fraction of input channels kept at 4 bits")
    q.add_argument("--method", choices=METHODS, default=q_default("method"),
                   help="ptq161: learn the binary scales α, r1, r2 block by block (PTQ1.61); "
                        "closed-form: α = mean|W - μ|, no learning [default: %(default)s]")
    q.add_argument("--preset", choices=tuple(PRESETS), default=next(iter(PRESETS)),
                   help="quantization budget: default (one epoch of PTQ1.61's block-wise "
                        "learning, then one of end-to-end tuning of every layer's scales, "
                        "offsets, biases and the norm weights against the fp model's logits: "
                        "SmolLM2 perplexity 240 in ~17 minutes here), fast (16 samples, one "
                        "epoch, no end-to-end tuning: a few minutes) or best (restorative LoRA "
                        "first, two epochs of learning and one r2 per Linear as in the paper, "
                        "end-to-end tuning over 192 sequences, 3x the default calibration rows; "
                        "docs/results.md) [default: %(default)s]")
    q.add_argument("--lora", action=argparse.BooleanOptionalAction, default=None,
                   help="restorative LoRA on the fp model before quantizing, PTQ1.61's "
                        "preprocessing (w1.61-style schemes with PTQ1.61) "
                        "[default: the preset's: on for best]")
    q.add_argument("--e2e-epochs", type=int,
                   help="epochs of end-to-end tuning over the calibration text; 0: none "
                        "[default: the preset's: 1 for default and best, none for fast]")
    q.add_argument("--e2e-samples", type=int,
                   help="sequences per epoch of end-to-end tuning: more than --calib-samples "
                        "reads further sequences of the calibration text (of random tokens "
                        "for a model without a tokenizer) "
                        "[default: the preset's: --calib-samples, 192 for best]")
    q.add_argument("--epochs", type=int, help="PTQ1.61 epochs per block [default: the preset's]")
    q.add_argument("--lr", type=float, help="PTQ1.61 learning rate of α, r1 and r2 "
                   "[default: the preset's]")
    q.add_argument("--share-r2", action=argparse.BooleanOptionalAction, default=None,
                   help="PTQ1.61: learn one r2 per input activation instead of one per Linear, "
                        "so that q/k/v and gate/up stack into one op each: faster decoding "
                        "(7-19%% less time per token on SmolLM2), slightly higher perplexity "
                        "(+1.4%% after end-to-end tuning; docs/results.md) "
                        "[default: the preset's: on for default and fast, off for best]")
    q.add_argument("--outlier-suppression", action=argparse.BooleanOptionalAction,
                   default=q_default("outlier_suppression"),
                   help="fold OS+ shift/scale into norms and Linears before quantizing (and "
                        "before PTQ1.61 learning); t is searched to minimise the quantization "
                        "error of each norm's Linears under the scheme [default: on for the "
                        "activation-quantized schemes w8a8/w6a6, off otherwise]")
    q.add_argument("--os-grid", type=int, default=q_default("os_grid"),
                   help="candidates of t in the OS+ search [default: %(default)s]")
    q.add_argument("--os-quantile", type=float, default=q_default("os_quantile"),
                   help="no OS+ search: t = this quantile of the channels' half-ranges")
    q.add_argument("--skip", default=q_default("skip"),
                   help="regex of Linear names that get --head-scheme instead of --scheme "
                        "[default: the model family's output head and embedding names]")
    q.add_argument("--head-scheme", default=AUTO,
                   help="scheme of the --skip Linears (the output head); an all-4-bit one gets "
                        "GPTQ codes; 'none' keeps them in floating point (~1.5%% lower "
                        "perplexity on SmolLM2, 1.4x the file, slower tokens) "
                        "[default: w4a16; the main scheme for w8a8/w6a6]")
    q.add_argument("--embeddings-fp16", action=argparse.BooleanOptionalAction,
                   default=q_default("embeddings_fp16"),
                   help="store embedding tables in fp16 (halves the largest fp tensor) "
                        "[default: on]")
    p.add_argument("--threads", type=int, default=run_default("threads"),
                   help="CPU threads [default: the cores idle at the start]")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress messages")
    _add_debug(p)
    return p


def run_config(args: argparse.Namespace):
    """The RunConfig an argument namespace of `build_parser` stands for."""
    import dataclasses

    from .config import AUTO, E2EConfig, LearnConfig, LoRAConfig, QuantizeConfig, RunConfig
    from .errors import QexportError
    from .schemes import parse_scheme

    learn = {k: v for k, v in (("epochs", args.epochs), ("lr_alpha", args.lr),
                               ("lr_r1", args.lr), ("lr_r2", args.lr)) if v is not None}
    if args.share_r2 is not None:
        learn["share_r2"] = args.share_r2
    head_arg = args.head_scheme.strip().lower()
    head = None if head_arg in ("none", "fp") else AUTO if head_arg == AUTO \
        else parse_scheme(args.head_scheme)
    e2e = E2EConfig.preset(args.preset)
    if args.e2e_epochs is not None:
        if args.e2e_epochs < 0:
            raise QexportError("--e2e-epochs must be at least 0 (0: no end-to-end tuning)")
        e2e = dataclasses.replace(e2e or E2EConfig(), epochs=args.e2e_epochs) \
            if args.e2e_epochs else None
    if args.e2e_samples is not None:
        if args.e2e_samples < 1:
            raise QexportError("--e2e-samples must be at least 1")
        if e2e is None:
            raise QexportError("--e2e-samples needs end-to-end tuning, which this run has none "
                               "of (--preset fast or --e2e-epochs 0): give --e2e-epochs N")
        e2e = dataclasses.replace(e2e, n_samples=args.e2e_samples)
    scheme = parse_scheme(args.scheme).with_overrides(args.salient_ratio)
    lora = LoRAConfig.preset(args.preset) if args.lora is None else \
        LoRAConfig() if args.lora else None
    preprocess = None
    if lora is not None and args.method == "ptq161" and scheme.kind == "mixed" and \
            scheme.salient_ratio < 1.0:
        from .preprocess import RestorativeLoRA
        preprocess = RestorativeLoRA(dataclasses.replace(lora,
                                                         salient_ratio=scheme.salient_ratio))
    quantize = QuantizeConfig(
        scheme=scheme, preprocess=preprocess,
        method=args.method, learn=LearnConfig.preset(args.preset, **learn), e2e=e2e,
        outlier_suppression=args.outlier_suppression, os_quantile=args.os_quantile,
        os_grid=args.os_grid, skip=args.skip, head_scheme=head,
        embeddings_fp16=args.embeddings_fp16, fused_attention=args.fused_attention)
    return RunConfig(
        model=args.model, output=args.output, quantize=quantize, target=args.target,
        kv_cache=args.kv_cache, force=args.force, resume=args.resume,
        trust_pickle=args.trust_pickle,
        calib=args.calib, calib_samples=args.calib_samples, calib_seqlen=args.calib_seqlen,
        eval_text=args.eval_text, eval_tokens=args.eval_tokens, eval_window=args.eval_window,
        perplexity=args.perplexity, threads=args.threads)


def run(args) -> int:
    from . import pipeline

    say = (lambda msg: None) if args.quiet else _log
    with _interrupt_on_sigterm():
        result = pipeline.run(run_config(args), progress=say)
    if not result.parity_ok:
        print(f"qexport: error: parity check failed (ORT disagrees with the PyTorch reference); "
              f"see {result.output / 'report.md'}", file=sys.stderr)
        return EXIT_PARITY
    return _finish_code(result.finish, say)


@contextlib.contextmanager
def _interrupt_on_sigterm():
    """SIGTERM (a killed CI job, `timeout`, a scheduler) ends a run as Ctrl-C does (exit 130):
    the temporary output folder removed, the finished learning kept, the way to resume said.
    The previous handler is restored afterwards."""
    import signal
    import threading

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _finish_code(finish, say) -> int:
    """Exit code (and message) of a target's step after the folder was written."""
    if finish is None:
        return 0
    codes = {"done": 0, "unavailable": EXIT_TARGET_UNAVAILABLE, "parity_failed": EXIT_PARITY}
    if finish.status not in codes:
        raise ValueError(f"unknown target outcome {finish.status!r}")
    if finish.status == "done":
        say(finish.message)
    else:
        print(f"qexport: error: {finish.message}", file=sys.stderr)
    return codes[finish.status]


def build_engine_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qexport build-engine",
                                description="Build a TensorRT engine from an exported model.onnx "
                                            "and check it against the export's reference.")
    p.add_argument("onnx", help="model.onnx written by qexport")
    p.add_argument("-o", "--output", help="engine file [default: model.engine beside the model]")
    p.add_argument("--fp16", action=argparse.BooleanOptionalAction, default=True,
                   help="allow fp16 kernels [default: on]")  # trt.build_engine's default
    _add_debug(p)
    return p


def build_engine_main(args) -> int:
    from .targets import trt

    return _finish_code(trt.engine_for(Path(args.onnx), Path(args.output) if args.output
                                       else None, fp16=args.fp16, progress=_log), _log)


def _traceback_if_debug(e: BaseException, argv: list[str]) -> None:
    if "--debug" in argv:
        import traceback
        traceback.print_exception(e)


def _add_debug(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true",
                   help="on an error, also print the traceback of what caused it")


def main(argv: list[str] | None = None) -> int:
    from .errors import QexportError
    argv = sys.argv[1:] if argv is None else argv
    sub = argv[0] if argv else None
    try:
        if sub == "build-engine":
            return build_engine_main(build_engine_parser().parse_args(argv[1:]))
        if sub == "eval":
            return eval_main(build_eval_parser().parse_args(argv[1:]))
        if sub in ("generate", "chat"):
            return generate_main(sub, build_generate_parser(sub).parse_args(argv[1:]))
        if sub == "triton":
            return triton_main(build_triton_parser().parse_args(argv[1:]))
        return run(build_parser().parse_args(argv))
    except QexportError as e:
        _traceback_if_debug(e, argv)
        print(f"qexport: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:  # noqa: BLE001 - a bug of ours: still one line, unless --debug
        from .errors import first_line
        _traceback_if_debug(e, argv)
        print(f"qexport: error: unexpected {first_line(e)} (a qexport bug: please report it "
              "with the output of --debug)", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as e:
        print(f"qexport: interrupted; {str(e) or 'nothing was written'}", file=sys.stderr)
        return 130


# ------------------------------------------------------------------------------------- eval
def build_eval_parser() -> argparse.ArgumentParser:
    from .config import RunConfig, default
    from .pipeline import EVAL_TOKENS

    p = argparse.ArgumentParser(
        prog="qexport eval",
        description="Perplexity of an export: the fp model, the PyTorch quantized model rebuilt "
                    "from the export's packed weights, and the ONNX file through ONNX Runtime.")
    p.add_argument("output", help="a folder written by qexport (with model.onnx)")
    p.add_argument("--model", help="the fp model [default: the one the export was made from]")
    p.add_argument("--trust-pickle", action="store_true")
    p.add_argument("--eval", dest="eval_text", metavar="PATH",
                   help="held-out text [default: Brown from char 3,000,000]")
    p.add_argument("--eval-tokens", type=int, default=EVAL_TOKENS, help="[default: %(default)s]")
    p.add_argument("--eval-window", type=int, default=default(RunConfig, "eval_window"),
                   help="[default: %(default)s]")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("-q", "--quiet", action="store_true")
    _add_debug(p)
    return p


def eval_main(args) -> int:
    from . import pipeline

    say = (lambda msg: None) if args.quiet else _log
    ppl = pipeline.evaluate_export(args.output, model=args.model,
                                   trust_pickle=args.trust_pickle, eval_text=args.eval_text,
                                   eval_tokens=args.eval_tokens, eval_window=args.eval_window,
                                   threads=args.threads, progress=say)
    print(f"perplexity on {ppl['tokens']} tokens of {ppl['text']} ({ppl['window']}-token "
          f"windows):")
    for key in ("fp", "quantized_torch", "quantized_ort"):
        print(f"  {key:16s} {ppl[key]:.3f}")
    print(f"  ORT vs PyTorch quantized: {100 * ppl['gap']:.3f}% apart "
          f"(bound {100 * pipeline.EVAL_AGREEMENT:.1f}%)")
    if not ppl["agree"]:
        print("qexport: error: ONNX Runtime and PyTorch quantized perplexities disagree",
              file=sys.stderr)
        return EXIT_PARITY
    return 0


# --------------------------------------------------------------------------- generate, chat
def build_generate_parser(command: str) -> argparse.ArgumentParser:
    from .config import default
    from .generate import MAX_NEW_TOKENS, Sampling

    p = argparse.ArgumentParser(
        prog=f"qexport {command}",
        description="Generate text from an export's KV-cache decoder (model_with_past.onnx) with "
                    "ONNX Runtime, streaming tokens as they come; then the time to first token "
                    "and tokens/s on stderr." if command == "generate" else
                    "Chat with an export through its tokenizer's chat template: one line per "
                    "turn on stdin; /reset forgets the conversation, /exit or end of input "
                    "ends it.")
    p.add_argument("output", help="a folder written by qexport (with model_with_past.onnx)")
    if command == "generate":
        prompt = p.add_mutually_exclusive_group(required=True)
        prompt.add_argument("--prompt", help="the text to continue")
        prompt.add_argument("--prompt-ids", metavar="IDS",
                            help="the prompt as token ids, separated by spaces or commas (for a "
                                 "folder without a tokenizer); the new ids are printed")
    else:
        p.add_argument("--system", help="a system message that starts the conversation")
    p.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS,
                   help="[default: %(default)s]")
    p.add_argument("--temperature", type=float, default=default(Sampling, "temperature"),
                   help="0 picks the most likely token (greedy); above 0 samples "
                        "[default: %(default)s]")
    p.add_argument("--top-k", type=int, default=default(Sampling, "top_k"),
                   help="sample among the k most likely tokens (0: all) [default: %(default)s]")
    p.add_argument("--top-p", type=float, default=default(Sampling, "top_p"),
                   help="then among the most likely tokens whose probability reaches p "
                        "[default: %(default)s]")
    p.add_argument("--seed", type=int, default=default(Sampling, "seed"),
                   help="sampling seed [default: a fresh one each run]")
    p.add_argument("--threads", type=int, default=None,
                   help="ONNX Runtime threads [default: ONNX Runtime's]")
    _add_debug(p)
    return p


def generate_main(command: str, args) -> int:
    from . import generate, serving
    from .errors import QexportError

    folder = Path(args.output)
    sampling = generate.Sampling(args.temperature, args.top_k, args.top_p, args.seed)
    sampling.validate()
    gen = generate.Generator(folder, threads=args.threads)
    tokenizer = generate.load_tokenizer(folder)
    stop = serving.stop_tokens(folder, tokenizer)

    def run(prompt_ids, stream) -> None:
        for token in gen.generate(prompt_ids, args.max_new_tokens, sampling, stop):
            print(stream(token), end="", flush=True)
        print(flush=True)
        _log(gen.stats.line())

    if command == "generate":
        if args.prompt_ids is not None:
            try:
                ids = [int(t) for t in args.prompt_ids.replace(",", " ").split()]
            except ValueError:
                raise QexportError("--prompt-ids takes integers separated by spaces or "
                                   "commas") from None
            run(ids, lambda t: f"{t} ")
            return 0
        if tokenizer is None:
            raise QexportError(f"{folder} has no tokenizer: give the prompt as --prompt-ids")
        ids = tokenizer(args.prompt, add_special_tokens=True)["input_ids"]
        print(args.prompt, end="", flush=True)
        run(ids, generate.TextStream(tokenizer).add)
        return 0
    if tokenizer is None:
        raise QexportError(f"{folder} has no tokenizer to chat with")
    messages = [{"role": "system", "content": args.system}] if args.system else []
    generate.chat_ids(tokenizer, messages or [{"role": "user", "content": ""}])  # has one?
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            return 0
        if line.strip() == "/reset":
            messages = messages[:1] if args.system else []
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.strip()})
        stream = generate.TextStream(tokenizer)
        run(generate.chat_ids(tokenizer, messages), stream.add)
        messages.append({"role": "assistant", "content": stream.text})


# ------------------------------------------------------------------------------------ triton
def build_triton_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qexport triton",
        description="Write a Triton Inference Server model repository from an export: model.onnx "
                    "(and model_with_past.onnx) through the ONNX Runtime backend with the qexport "
                    "op library, and model.engine through the TensorRT backend where one was "
                    "built. docs/serving.md has the docker command that serves it.")
    p.add_argument("output", help="a folder written by qexport")
    p.add_argument("-o", "--repository", default=None,
                   help="the repository folder to create [default: OUTPUT/triton]")
    p.add_argument("--name", default="qexport", help="the model's name [default: %(default)s]")
    _add_debug(p)
    return p


def triton_main(args) -> int:
    from .serving import write_triton_repository

    repo = Path(args.repository) if args.repository else Path(args.output) / "triton"
    for config in write_triton_repository(Path(args.output), repo, args.name):
        _log(f"wrote {config}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
