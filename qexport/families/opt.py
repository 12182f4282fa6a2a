"""OPT (facebook/opt-*): blocks under model.decoder.layers; a learned position table, so the
fused attention (families/attention.py) runs without rotary, and the KV-cache decoder reads
the table at each row's own positions."""
from .llama import decoder_family

FAMILY = decoder_family("opt", ("opt",), block_paths=("model.decoder.layers", "decoder.layers"))
