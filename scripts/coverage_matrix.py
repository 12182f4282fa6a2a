#!/usr/bin/env python3
"""Writes docs/models.md: each tiny config of tests/tiny_models.py (COVERAGE_CONFIGS) through
qexport.pipeline.run with the defaults on a short calibration budget (the same run as
tests/test_coverage.py), and the path each took: family adapter, fused attention, KV-cache
decoder, PTQ1.61 learning, parity.

    python3 scripts/coverage_matrix.py            # writes docs/models.md
    python3 scripts/coverage_matrix.py --print    # prints it instead
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def run_one(model_type: str, work: pathlib.Path) -> dict:
    from qexport import pipeline
    from qexport.config import LearnConfig, QuantizeConfig, RunConfig
    from qexport.errors import QexportError
    from tiny_models import SENTENCE_POOLING, save_sentence_transformers, tiny_causal_lm

    src = work / model_type
    tiny_causal_lm(model_type).save_pretrained(src)
    if model_type in SENTENCE_POOLING:
        save_sentence_transformers(src, SENTENCE_POOLING[model_type])
    base = dict(calib_samples=2, calib_seqlen=32, perplexity=False, threads=1,
                quantize=QuantizeConfig(learn=LearnConfig.preset("fast")))
    t0 = time.perf_counter()
    try:
        result = pipeline.run(RunConfig(str(src), str(work / f"{model_type}-kv"),
                                        kv_cache=True, **base))
    except QexportError as e:
        if "--kv-cache" not in str(e):
            raise
        result = pipeline.run(RunConfig(str(src), str(work / f"{model_type}-out"), **base))
    r = result.report
    e2e = r["end_to_end"]
    return {"model_type": model_type, "family": r["family"],
            "attention": r["notes"]["attention"][0],
            "kv_cache": "kv_cache" in e2e,
            "learned": "learn_scales" not in r["notes"],
            "linears": r["bits"]["quantized_linears"],
            "outputs": list(e2e["outputs"]),
            "cosine": min(o["parity"]["cosine"] for o in e2e["outputs"].values()),
            "top1": e2e["parity"].get("top1_agreement"),
            "kv_cosine": e2e.get("kv_cache", {}).get("parity", {}).get("cosine"),
            "pooled": e2e.get("pooled_embedding"),
            "seconds": time.perf_counter() - t0}


def markdown(rows: list[dict]) -> str:
    from tiny_models import COVERAGE_CONFIGS

    lines = ["# Model coverage", "",
             "Written by `python3 scripts/coverage_matrix.py` (do not edit by hand); the same "
             "runs are `tests/test_coverage.py`. Each row: a 2-layer random-init model of the "
             "family (config below), through `qexport` with the defaults on 2×32 calibration "
             "tokens and the fast PTQ1.61 preset, with `--kv-cache` where the family has a "
             "KV-cache decoder. Parity: ONNX Runtime vs the PyTorch quantized model, on every "
             "output (an LM's logits; an encoder's hidden states and pooled embedding). "
             "Sentence embedding: an encoder's last_hidden_state pooled as its "
             "sentence-transformers config says (BERT is saved as one, with CLS pooling), else "
             "by the mean over tokens; the lowest cosine over the rows, ORT vs fp (random-init "
             "weights at 1.61 bits: a bug check of the path, not an accuracy figure). "
             "Also covered elsewhere: a torch.export `.pt2` of a custom module and a pickled "
             "module (`tests/test_end_to_end.py`).",
             "",
             "| model_type | family adapter | attention | KV cache (parity cosine) | PTQ1.61 "
             "learning | quantized Linears | outputs | parity: lowest cosine / top-1 | sentence "
             "embedding: pooling, ORT vs fp |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        kv = f"yes ({r['kv_cosine']:.6f})" if r["kv_cache"] else "no"
        top1 = "–" if r["top1"] is None else f"{r['top1']:.3f}"
        pe = r["pooled"]
        pooled = f"{pe['pooling']}, {pe['ort_vs_fp_min_cosine']:.4f}" if pe else "–"
        lines.append(f"| {r['model_type']} | {r['family']} | {r['attention']} | {kv} | "
                     f"{'yes' if r['learned'] else 'no (closed form)'} | {r['linears']} | "
                     f"{', '.join(r['outputs'])} | {r['cosine']:.6f} / {top1} | {pooled} |")
    lines += ["", "Configs (`tests/tiny_models.py`, COVERAGE_CONFIGS; 2 layers, vocabulary 128):",
              ""]
    lines += [f"- {k}: `{json.dumps(v, sort_keys=True)}`" for k, v in COVERAGE_CONFIGS.items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--print", action="store_true", help="print instead of writing the file")
    args = ap.parse_args(argv)
    from tiny_models import COVERAGE_CONFIGS

    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for model_type in COVERAGE_CONFIGS:
            rows.append(run_one(model_type, pathlib.Path(tmp)))
            print(f"{model_type}: {rows[-1]}", file=sys.stderr)
    text = markdown(rows)
    if args.print:
        print(text)
    else:
        (ROOT / "docs" / "models.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
