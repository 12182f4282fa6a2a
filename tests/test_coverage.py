"""The coverage matrix: a tiny random-init model of each family qexport adapts goes through
the CLI with the defaults (on a short calibration budget): export, ONNX Runtime parity against
the PyTorch quantized model, the KV-cache decoder where the family has one, and the report's
account of the path each model took. docs/models.md is written from the same table by
scripts/coverage_matrix.py."""
from __future__ import annotations

import json

import onnx
import pytest

from test_cli import run_cli
from tiny_models import (COVERAGE_CONFIGS, ENCODERS, SENTENCE_POOLING,
                         save_sentence_transformers, tiny_causal_lm)

# model_type -> (family adapter, fused attention, KV-cache decoder)
EXPECTED = {
    "llama": ("llama", True, True),
    "mistral": ("llama", True, True),
    "qwen2": ("llama", True, True),
    "qwen3": ("qwen3", True, True),
    "phi3": ("phi3", True, True),
    "gemma": ("gemma", True, True),
    "gemma2": ("gemma", True, True),
    "gemma3_text": ("gemma", True, True),
    "gpt2": ("gpt2", True, True),
    "opt": ("opt", True, True),
    "bert": ("bert", False, False),
    "roberta": ("roberta", False, False),
}
# Linears per transformer block (Phi-3 fuses q/k/v and gate/up; GPT-2 likewise)
BLOCK_LINEARS = {"phi3": 4, "gpt2": 4, "opt": 6, "bert": 6, "roberta": 6}
OTHER_LINEARS = {"bert": 1, "roberta": 1}  # the pooler (quantized with the main scheme)
BUDGET = ["--calib-samples", "2", "--calib-seqlen", "32", "--preset", "fast",
          "--no-perplexity", "--threads", "1"]


@pytest.mark.parametrize("model_type", sorted(COVERAGE_CONFIGS))
def test_family_exports_with_the_defaults(model_type, tmp_path):
    family, fused, kv = EXPECTED[model_type]
    src = tmp_path / model_type
    tiny_causal_lm(model_type).save_pretrained(src)
    if model_type in SENTENCE_POOLING:  # a sentence-transformers folder: its pooling is read
        save_sentence_transformers(src, SENTENCE_POOLING[model_type])
    out = tmp_path / "out"
    proc = run_cli(src, "-o", out, *BUDGET, *(["--kv-cache"] if kv else []))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["family"] == family
    assert report["parity"]["ok"]
    outputs = report["end_to_end"]["outputs"]
    for name, result in outputs.items():  # every output, and top-1 for an LM's logits
        assert result["parity"]["cosine"] >= 0.999, (name, result)
        assert result["parity"].get("top1_agreement", 1.0) >= 0.99, (name, result)
    assert list(outputs) == (["last_hidden_state", "pooler_output"]
                             if model_type in ENCODERS else ["logits"])
    # every block Linear quantized with the main scheme, and PTQ1.61 found the blocks
    assert report["bits"]["quantized_linears"] == \
        2 * BLOCK_LINEARS.get(model_type, 7) + OTHER_LINEARS.get(model_type, 0)
    assert "learn_scales" not in report["notes"], report["notes"]
    ops = [n.op_type for n in onnx.load(out / "model.onnx", load_external_data=False).graph.node]
    assert (ops.count("GroupQueryAttention") == 2) == fused
    assert report["notes"]["attention"][0].startswith("2 of 2" if fused else "traced")
    if model_type in ENCODERS:  # the sentence embedding, pooled as the folder says
        pooled = report["end_to_end"]["pooled_embedding"]
        assert pooled["pooling"] == SENTENCE_POOLING.get(model_type, "mean_tokens")
        assert pooled["parity_min_cosine"] >= 0.999
        assert len(pooled["ort_vs_fp_cosines"]) == 2 and -1 <= pooled["ort_vs_fp_min_cosine"] <= 1
        assert "## Sentence embedding" in (out / "report.md").read_text()
    else:
        assert "pooled_embedding" not in report["end_to_end"]
    if kv:
        assert report["end_to_end"]["kv_cache"]["parity"]["cosine"] >= 0.999
        assert (out / "model_with_past.onnx").is_file()
