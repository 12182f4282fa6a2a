"""Train a small OPT (pre-LayerNorm with biases, the OS+ paper's family) on the Brown corpus's
calibration part, so that activation-quantization ablations have a LayerNorm-with-bias model
with a real perplexity (no such model installs from the registries; docs/results.md).

Not a test. Writes a Hugging Face folder (model + a byte-level BPE tokenizer trained on the
same text) that `qexport` and benchmarks/standard_ops.py take:

    python benchmarks/tiny_opt_brown.py --out /tmp/opt-brown          # ~10 min on 2 cores
    python benchmarks/standard_ops.py /tmp/opt-brown --work /tmp/std-opt --only w8a8 w8a8+os w6a6 w6a6+os

Trained on characters 0-3,000,000 of Brown (qexport.data.brown_splits, the calibration
split); qexport's held-out perplexity text is never seen.
"""
from __future__ import annotations

import argparse
import math
import pathlib
import time

import torch


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=pathlib.Path, required=True)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--minutes", type=float, default=8.0, help="training time budget")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast

    from qexport import data

    torch.manual_seed(args.seed)
    text, _ = data.brown_splits()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text[i:i + 10000] for i in range(0, len(text), 10000)],
                            trainers.BpeTrainer(vocab_size=args.vocab,
                                                special_tokens=["<pad>", "</s>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                                        eos_token="</s>", bos_token="</s>")
    ids = torch.tensor(tok.encode(text).ids, dtype=torch.long)
    print(f"{ids.numel():,} training tokens, vocabulary {len(tokenizer)}", flush=True)

    config = OPTConfig(vocab_size=len(tokenizer), hidden_size=args.hidden,
                       ffn_dim=4 * args.hidden, num_hidden_layers=args.layers,
                       num_attention_heads=args.hidden // 64, word_embed_proj_dim=args.hidden,
                       max_position_embeddings=512, pad_token_id=0, bos_token_id=1,
                       eos_token_id=1, do_layer_norm_before=True, dropout=0.0,
                       use_cache=False)
    model = OPTForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    end, step = time.time() + 60 * args.minutes, 0
    model.train()
    while time.time() < end:
        starts = torch.randint(0, ids.numel() - args.seq - 1, (args.batch,))
        batch = torch.stack([ids[s:s + args.seq] for s in starts])
        lr = args.lr * min(1.0, (step + 1) / 100)
        for group in opt.param_groups:
            group["lr"] = lr
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 200 == 0:
            print(f"step {step}: loss {loss.item():.3f} (perplexity {math.exp(loss.item()):.1f})",
                  flush=True)
        step += 1
    model.eval()
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(f"{step} steps; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
