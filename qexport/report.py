"""report.json and report.md of an export."""
from __future__ import annotations

import json
from pathlib import Path


def bits_summary(layers: list[dict], packed, head=lambda name: False) -> dict:
    """Bits of the Linears quantized with the main scheme (the output head, if quantized with
    --head-scheme, is counted apart under "head")."""
    def summary(names):
        weights = sum(packed[n].in_features * packed[n].out_features for n in names)
        nbytes = sum(packed[n].weight_nbytes() for n in names)
        return {"quantized_linears": len(names), "weights": weights, "stored_bytes": nbytes,
                "bits_per_weight": 8 * nbytes / weights if weights else 0.0,
                "max_layer_bits_per_weight": max((packed[n].bits_per_weight() for n in names),
                                                 default=0.0)}
    main = summary([n for n in packed if not head(n)])
    heads = [n for n in packed if head(n)]
    if heads:
        main["head"] = summary(heads)
    return main


def write(report: dict, out_dir: Path) -> None:
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    (out_dir / "report.md").write_text(markdown(report))


def _f(x, digits=4):
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}" if abs(x) < 1e6 else f"{x:.3g}"
    return str(x)


def _e(x):
    return "–" if x is None else f"{x:.2e}"


def _mib(n):
    return f"{n / 2**20:.2f} MiB"


def markdown(r: dict) -> str:
    lines = [f"# qexport report: {r['model']['name']} → {r['scheme']}", ""]
    verdict = "PASSED" if r["parity"]["ok"] else "FAILED"
    lines += [f"**Parity (ORT vs PyTorch quantized reference): {verdict}** "
              f"(cosine ≥ {r['parity']['min_cosine']}, top-1 ≥ {r['parity']['min_top1']})", ""]
    b, s = r["bits"], r["size"]
    lines += ["## Size", "",
              "| what | value |", "|---|---|",
              f"| quantized Linears | {b['quantized_linears']} ({b['weights']:,} weights) |",
              f"| bits per weight (every stored byte) | {b['bits_per_weight']:.3f} "
              f"(max layer {b['max_layer_bits_per_weight']:.3f}) |",
              f"| model file(s) | {_mib(s['onnx_bytes'])} |",
              f"| fp32 / fp16 model (parameters × 4 / × 2) | {_mib(s['fp32_bytes'])} / "
              f"{_mib(s['fp16_bytes'])} |",
              f"| ratio to fp32 / fp16 | {s['onnx_bytes'] / s['fp32_bytes']:.3f} / "
              f"{s['onnx_bytes'] / s['fp16_bytes']:.3f} |",
              f"| quantized Linear weights: fp32 → stored | {_mib(4 * b['weights'])} → "
              f"{_mib(b['stored_bytes'])} |"]
    if "head" in b:
        h = b["head"]
        lines.append(f"| output head ({r['config']['head_scheme']}) | {h['weights']:,} weights, "
                     f"{h['bits_per_weight']:.3f} bits/weight |")
    lines.append("")
    e2e = r["end_to_end"]
    lines += ["## End to end (the logits of an LM, else each output)", "", "| comparison | cosine | top-1 | rel. error | max |diff| |",
              "|---|---|---|---|---|"]
    rows = [("ORT vs PyTorch quantized (parity)", e2e.get("parity")),
            ("PyTorch quantized vs fp (quantization error)", e2e.get("quant_error")),
            ("ORT vs fp", e2e.get("ort_vs_fp"))]
    for name, out in list(e2e.get("outputs", {}).items())[1:]:  # the first is the rows above
        rows += [(f"output {name}: ORT vs PyTorch quantized (parity)", out["parity"]),
                 (f"output {name}: PyTorch quantized vs fp", out["quant_error"])]
    if "kv_cache" in e2e:
        rows.append((f"KV-cache decoder vs PyTorch quantized ({e2e['kv_cache']['inputs']})",
                     e2e["kv_cache"]["parity"]))
    for label, m in rows:
        if m:
            lines.append(f"| {label} | {_f(m['cosine'], 6)} | {_f(m.get('top1_agreement'))} | "
                         f"{m['rel_error']:.2e} | {m['max_abs_diff']:.2e} |")
    lines += ["", f"Inputs: {e2e['inputs']}", ""]
    if e2e.get("parity_rule"):
        lines += [f"Parity rule: {e2e['parity_rule']}.", ""]
    pe = e2e.get("pooled_embedding")
    if pe:
        lines += ["## Sentence embedding (pooled last_hidden_state)", "",
                  f"Pooling: {pe['pooling']} ({pe['source']}); the smallest cosine over the "
                  "rows of the inputs above.", "",
                  "| comparison | min cosine |", "|---|---|",
                  f"| ORT vs fp | {_f(pe['ort_vs_fp_min_cosine'], 6)} |",
                  f"| PyTorch quantized vs fp | {_f(pe['quant_vs_fp_min_cosine'], 6)} |",
                  f"| ORT vs PyTorch quantized | {_f(pe['parity_min_cosine'], 6)} |", ""]
    sp = r.get("speed")
    if sp:
        lines += ["## Speed (this machine)", "",
                  "| forward | ONNX Runtime + qexport ops | PyTorch fp32 (eager) | PyTorch ÷ ORT |",
                  "|---|---|---|---|"]
        for key, label in (("one_token", "1 token"),
                           ("prompt", f"{sp['prompt_tokens']}-token prompt")):
            row = sp[key]
            lines.append(f"| {label} | {row['ort_ms']:.2f} ms | {row['torch_fp32_ms']:.2f} ms | "
                         f"{row['torch_fp32_ms'] / row['ort_ms']:.2f}x |")
        if "decoded_token" in sp:
            d = sp["decoded_token"]
            lines.append(f"| 1 token decoded after {d['cached_tokens']} cached (KV-cache "
                         f"decoder, cache in place) | {d['ort_ms']:.2f} ms | | |")
        lines += ["", f"Medians with {sp['threads']} thread(s). A quick figure, not a "
                  "benchmark: `benchmarks/bench_model.py` compares with an fp32 ONNX model in "
                  "ONNX Runtime.", ""]
    ppl = r.get("perplexity")
    if ppl:
        lines += ["## Perplexity (held-out text)", "",
                  f"{ppl['tokens']} tokens of {ppl['text']}, {ppl['window']}-token windows.", "",
                  "| model | perplexity |", "|---|---|"]
        for key, label in (("fp", "fp32 (PyTorch)"), ("quantized_torch", "quantized (PyTorch)"),
                           ("quantized_ort", "quantized (ONNX Runtime + qexport ops)")):
            lines.append(f"| {label} | {_f(ppl.get(key), 2)} |")
        lines.append("")
    elif r.get("perplexity_skipped"):
        lines += ["## Perplexity", "", f"Skipped: {r['perplexity_skipped']}", ""]
    lines += ["## Layers", "",
              "| layer | shape | salient | bits/w | quant SQNR dB | parity cosine | parity max |diff| |",
              "|---|---|---|---|---|---|---|"]
    for row in r["layers"]:
        q, p = row.get("quant_error", {}), row.get("parity", {})
        lines.append(f"| {row['layer']} | {row['shape'][0]}×{row['shape'][1]} | {'–' if row['salient'] is None else row['salient']} "
                     f"| {row['bits_per_weight']:.3f} | {_f(q.get('sqnr_db'), 2)} | "
                     f"{_f(p.get('cosine'), 6)} | {_e(p.get('max_abs_diff'))} |")
    notes = r.get("notes", {})
    shown = [f"- {what}: {n}" for key, what in (("attention", "attention"),
                                               ("context", "context"),
                                               ("learn_scales", "PTQ1.61"),
                                               ("fold_outlier_shift_scale", "OS+"))
             for n in notes.get(key, [])]
    if "op_library" in r:
        shown.insert(0, "- runtime: " + (
            "needs the qexport op library (libqexport_ops.so, in this folder)"
            if r["op_library"] else "ONNX Runtime's own ops only: runs on any ONNX Runtime "
            "build, no op library needed (none copied)"))
    if r.get("family"):
        shown.insert(0, f"- model family: {r['family']} (target {r.get('target', 'ort')})")
    if shown:
        lines += ["", "## Notes", ""] + shown
    lines += ["", "## Time per stage", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in r["timings"].items()]
    lines += ["", f"Config: `{json.dumps(r['config'], sort_keys=True)}`", ""]
    return "\n".join(lines)
