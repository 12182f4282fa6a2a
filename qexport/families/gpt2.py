"""GPT-2: blocks under transformer.h (its projections are transformers Conv1D modules);
learned position table of n_positions."""
from . import Family, register

FAMILY = register(Family("gpt2", model_types=("gpt2",), block_paths=("transformer.h", "h"),
                         context_attrs=("n_positions", "max_position_embeddings")))
