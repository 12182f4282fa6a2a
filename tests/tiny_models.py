"""Small random-init Hugging Face models for tests (Llama family and OPT: LayerNorm + bias)."""
from __future__ import annotations

import torch


def tiny_llama(seed: int = 0, outliers: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      use_cache=False, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    if outliers:
        _add_norm_outliers(model, seed)
    return model


def tiny_opt(seed: int = 0, outliers: bool = True):
    from transformers import OPTConfig, OPTForCausalLM
    torch.manual_seed(seed)
    cfg = OPTConfig(vocab_size=128, hidden_size=64, ffn_dim=160, num_hidden_layers=2,
                    num_attention_heads=4, word_embed_proj_dim=64, max_position_embeddings=256,
                    use_cache=False)
    model = OPTForCausalLM(cfg).eval()
    if outliers:
        _add_norm_outliers(model, seed)
    return model


def _add_norm_outliers(model, seed):
    """Random-init norms are all ones; real models have outlier channels and shifted biases."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.dim() == 1:
                p.mul_(1 + 0.3 * torch.randn(p.shape, generator=g))
                if name.endswith("bias"):
                    p.add_(0.5 * torch.randn(p.shape, generator=g))
                else:
                    p[:3] *= 8.0


class LogitsOnly(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids, use_cache=False).logits


def save_with_tokenizer(model, folder):
    """Save `model` with a byte-level tokenizer of its 128-token vocabulary (ASCII characters),
    so the folder loads like a real LM: calibration text and perplexity work offline."""
    save_tokenizer(folder)
    model.save_pretrained(folder)
    return folder


def save_tokenizer(folder):
    """The tokenizer of save_with_tokenizer alone: token i is the character chr(i)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(i): i for i in range(128)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=chr(0)))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=chr(0)).save_pretrained(folder)
    return folder


# Tiny random-init configs of each family qexport adapts, with the structural features of the
# real models (head sizes, GQA ratios, tied or untied heads, q/k/v biases, q/k norms, fused
# qkv, sliding windows, soft-capping, short position tables), for the coverage matrix
# (tests/test_coverage.py, docs/models.md). model_type -> config keywords.
COVERAGE_CONFIGS = {
    "llama": dict(hidden_size=64, intermediate_size=160, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=False),  # head 16, GQA 2:1
    "mistral": dict(hidden_size=128, intermediate_size=192, num_attention_heads=2,
                    num_key_value_heads=1, head_dim=64, sliding_window=16,
                    tie_word_embeddings=True),  # head 64, GQA 2:1, tied, 16-token window
    "qwen2": dict(hidden_size=160, intermediate_size=192, num_attention_heads=2,
                  num_key_value_heads=2, tie_word_embeddings=True),  # head 80, q/k/v biases
    "qwen3": dict(hidden_size=64, intermediate_size=160, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=128, tie_word_embeddings=True),  # q/k norms
    "phi3": dict(hidden_size=128, intermediate_size=192, num_attention_heads=2,
                 num_key_value_heads=2, sliding_window=None, pad_token_id=0, bos_token_id=1,
                 eos_token_id=2,
                 tie_word_embeddings=False),  # head 64, one qkv projection
    "gemma": dict(hidden_size=64, intermediate_size=128, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=256),  # head 256, one kv head (gemma-2b)
    "gemma2": dict(hidden_size=64, intermediate_size=128, num_attention_heads=2,
                   num_key_value_heads=1, head_dim=256, sliding_window=16,
                   attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
    "gemma3_text": dict(hidden_size=64, intermediate_size=128, num_attention_heads=2,
                        num_key_value_heads=1, head_dim=64, sliding_window=16,
                        layer_types=["sliding_attention", "full_attention"]),  # 2 rotary bases
    "gpt2": dict(n_embd=64, n_head=4, n_positions=64, bos_token_id=1,
                 eos_token_id=2),  # Conv1D, 64-position table
    "opt": dict(hidden_size=64, ffn_dim=160, num_attention_heads=4, word_embed_proj_dim=64,
                max_position_embeddings=96),
    # encoders (AutoModel: every output exported and checked)
    "bert": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                 max_position_embeddings=64),
    "roberta": dict(hidden_size=64, intermediate_size=128, num_attention_heads=2,
                    max_position_embeddings=66, pad_token_id=1, bos_token_id=0,
                    eos_token_id=2),  # 64 usable positions
}
ENCODERS = ("bert", "roberta")
# Coverage encoders saved as sentence-transformers folders (a Pooling module), and its mode
SENTENCE_POOLING = {"bert": "cls_token"}


def save_sentence_transformers(folder, mode: str) -> None:
    """Beside a saved encoder, the files that make it a sentence-transformers model: modules.json
    and the Pooling module's config (one pooling mode)."""
    import json
    from pathlib import Path

    folder = Path(folder)
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling",
         "type": "sentence_transformers.models.Pooling"}]))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(
        {f"pooling_mode_{m}": m == mode for m in ("cls_token", "mean_tokens", "max_tokens")}))


def tiny_causal_lm(model_type: str, seed: int = 0):
    """A 2-layer, 128-token-vocabulary causal LM of `model_type` (COVERAGE_CONFIGS; an encoder
    for ENCODERS)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    torch.manual_seed(seed)
    layers = {"n_layer" if model_type == "gpt2" else "num_hidden_layers": 2}
    cfg = AutoConfig.for_model(model_type, vocab_size=128, use_cache=False, **layers,
                               **COVERAGE_CONFIGS[model_type])
    auto = AutoModel if model_type in ENCODERS else AutoModelForCausalLM
    model = auto.from_config(cfg, attn_implementation="eager").eval()
    _add_norm_outliers(model, seed)
    return model
