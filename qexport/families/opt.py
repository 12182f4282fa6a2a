"""OPT (facebook/opt-*): blocks under model.decoder.layers; learned position table."""
from . import Family, register

FAMILY = register(Family("opt", model_types=("opt",), block_paths=("model.decoder.layers",
                                                                   "decoder.layers")))
