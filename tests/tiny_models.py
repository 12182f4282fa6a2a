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
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(i): i for i in range(128)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=chr(0)))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=chr(0)).save_pretrained(folder)
    model.save_pretrained(folder)
    return folder
