"""BERT-style encoders (BERT, RoBERTa and its copies): blocks under encoder.layer (inside
.bert / .roberta for the task classes). Exported with every output (last_hidden_state,
pooler_output, ...), each checked for parity; no perplexity (no language-model head), no
KV cache, attention as traced ops. RoBERTa's position table starts after padding_idx: its
first 2 positions are never a token's."""
from . import Family, register

_PATHS = ("encoder.layer", "bert.encoder.layer", "roberta.encoder.layer")
# ONNX Runtime's GroupQueryAttention attends causally: an encoder's attention stays traced
_BIDIRECTIONAL = "bidirectional attention (the fused op is causal only)"
BERT = register(Family("bert", model_types=("bert",), block_paths=_PATHS,
                       traced_attention=_BIDIRECTIONAL))
ROBERTA = register(Family("roberta", model_types=("roberta", "xlm-roberta"),
                          block_paths=_PATHS, context_reserved=2,
                          traced_attention=_BIDIRECTIONAL))
