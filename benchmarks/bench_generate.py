"""Generation benchmark: qexport's Generator and onnxruntime-genai on the w1.61a16 and fp32
KV-cache decoders of SmolLM2-135M.

Not a test. Per thread count, for each (model, runtime): greedy generation of --new-tokens
tokens after a --prompt-tokens prompt (the first tokens of the held-out Brown text), forced
to the full length (no EOS stop: genai's min_length = max_length; qexport's without stop
ids), --repeats times, the four runs taking turns so that noise from other tenants hits all
alike; medians of the time to the first token (the prompt's forward, the cache filled) and of
the tokens/s after it. It also says whether the two runtimes pick the same greedy tokens.

Inputs:
    qexport smollm2-135m -o OUT                  # the w1.61a16 folder (model_with_past.onnx)
    python benchmarks/bench_generate.py --w161 OUT --fp32 fp32_gen
The fp32 folder is written when missing: the example's fp32 model through
api.export_with_past (no quantization), with the same tokenizer, generation_config.json and
genai_config.json as a qexport run writes (pipeline._serving_files).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import statistics
import time


def write_fp32_folder(folder: pathlib.Path) -> None:
    from qexport import api, models, native, pipeline, serving

    lm = models.load_model("smollm2-135m")
    folder.mkdir(parents=True, exist_ok=True)
    api.export_with_past(lm.module, None, folder / serving.WITH_PAST)
    shutil.copy2(native.library_path(), folder / native.LIBRARY_NAME)  # genai_config names it
    pipeline._serving_files(lm, folder)


def prompt_ids(folder: pathlib.Path, n: int) -> list[int]:
    from qexport import data
    from qexport.generate import load_tokenizer

    _, held_out = data.brown_splits()
    return data.tokenize(load_tokenizer(folder), held_out, n)[:n]


class Ours:
    name = "qexport Generator"

    def __init__(self, folder, threads):
        from qexport.generate import Generator

        self.gen = Generator(folder, threads=threads)

    def run(self, ids, new):
        tokens = list(self.gen.generate(ids, new))
        s = self.gen.stats
        return tokens, s.first_token_s, s.tokens_per_s


class Genai:
    name = "onnxruntime-genai"

    def __init__(self, folder, threads):
        import onnxruntime_genai as og

        self.og = og
        config = og.Config(str(folder))
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
        self.model = og.Model(config)

    def run(self, ids, new):
        og = self.og
        params = og.GeneratorParams(self.model)
        total = len(ids) + new
        params.set_search_options(max_length=total, min_length=total, do_sample=False)
        gen = og.Generator(self.model, params)
        t0 = time.perf_counter()
        gen.append_tokens(ids)
        gen.generate_next_token()
        first = time.perf_counter() - t0
        while not gen.is_done():
            gen.generate_next_token()
        rest = time.perf_counter() - t0 - first
        tokens = [int(t) for t in gen.get_sequence(0)[len(ids):]]
        return tokens, first, (len(tokens) - 1) / rest if rest > 0 else float("nan")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--w161", type=pathlib.Path, required=True, help="a qexport output folder")
    p.add_argument("--fp32", type=pathlib.Path, required=True,
                   help="the fp32 folder (written when missing)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    if not (args.fp32 / "model_with_past.onnx").is_file():
        print(f"writing the fp32 folder {args.fp32}", flush=True)
        write_fp32_folder(args.fp32)
    ids = prompt_ids(args.w161, args.prompt_tokens)
    folders = {"w1.61a16": args.w161, "fp32": args.fp32}
    print(f"prompt {len(ids)} tokens, {args.new_tokens} new tokens (greedy, no EOS stop), "
          f"medians of {args.repeats} interleaved runs\n")
    print("| threads | model | runtime | time to first token (ms) | tokens/s after it | "
          "tokens/s vs fp32 |")
    print("|---|---|---|---|---|---|")
    agree = {}
    for threads in args.threads:
        runners = {(m, r.name): r(f, threads) for m, f in folders.items() for r in (Ours, Genai)}
        results = {k: [] for k in runners}
        for _ in range(args.repeats):
            for key, runner in runners.items():
                results[key].append(runner.run(ids, args.new_tokens))
        med = {k: (statistics.median(r[1] for r in v), statistics.median(r[2] for r in v))
               for k, v in results.items()}
        for (model, runtime), (first, rate) in med.items():
            ratio = rate / med[("fp32", runtime)][1]
            print(f"| {threads} | {model} | {runtime} | {1e3 * first:.1f} | {rate:.1f} | "
                  f"{ratio:.2f}× |", flush=True)
        for model in folders:
            agree[model, threads] = (results[(model, Ours.name)][0][0]
                                     == results[(model, Genai.name)][0][0])
        del runners
    print()
    for (model, threads), same in agree.items():
        print(f"{model}, {threads} thread(s): greedy tokens of the two runtimes "
              f"{'identical' if same else 'DIFFER'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
