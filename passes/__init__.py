"""Graph passes over torch.fx GraphModules (from torch.export(...).module()).

A pass is ``fn(gm, ...) -> PassResult``; ``PassManager`` runs passes in order and checks the
graph after each one.
"""
from .manager import PassManager, PassResult
from .fold_outlier_shift_scale import (OutlierStats, choose_shift_scale, fold_outlier_shift_scale,
                                       search_shift_scale)
from .replace_linear import replace_linear
from .fuse_shared_input import fuse_shared_input, layers_of
from .embeddings_fp16 import embeddings_fp16
from .graph import linear_nodes, layer_name, norm_fed

__all__ = ["PassManager", "PassResult", "OutlierStats", "fold_outlier_shift_scale",
           "choose_shift_scale", "search_shift_scale", "replace_linear", "fuse_shared_input",
           "layers_of", "embeddings_fp16", "linear_nodes", "layer_name",
           "norm_fed"]
