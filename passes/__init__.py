"""Graph passes over torch.fx GraphModules (from torch.export(...).module()).

A pass is ``fn(gm) -> PassResult``; ``PassManager`` runs passes in order and checks the graph
after each one; ``build_passes`` is the one list of passes, built from a config. Passes import
nothing from qexport but the op registry (qexport.ops), the contract and the graph helpers
(qexport.graph): what they need from elsewhere (a quantizer, OS+'s choice of shift and
scale) is handed in.
"""
from __future__ import annotations

import functools
from typing import Callable

from .embeddings_fp16 import embeddings_fp16
from .fold_outlier_shift_scale import Choose, fold_outlier_shift_scale
from .fuse_shared_input import fuse_shared_input
from .fuse_skip_norm import fuse_skip_norm
from .manager import PassManager, PassResult
from .pack_qkv import pack_qkv
from .replace_linear import Quantizer, replace_linear

Pass = Callable[..., PassResult]


def _bind(fn: Pass, **kwargs) -> Pass:
    """fn with its arguments after gm bound, keeping fn's name (PassManager reports it)."""
    return functools.update_wrapper(functools.partial(fn, **kwargs), fn)


def build_passes(config, quantizer: Quantizer, *, choose: Choose | None = None,
                 stats: dict | None = None, folded: dict | None = None,
                 packed_out: dict | None = None, stack: bool = True) -> list[Pass]:
    """The passes that turn a traced fp graph into the quantized one, in order:
    1. fold_outlier_shift_scale (with `choose`, from `stats`; records `folded`),
    2. replace_linear (`quantizer`; fills `packed_out`),
    3. fuse_shared_input (`stack`),
    4. pack_qkv (`stack`: a stacked q/k/v feeds the fused attention without a split),
    5. fuse_skip_norm (where the runtime has ONNX Runtime's contrib ops, i.e. unless
       config.fused_attention is False: residual add + RMSNorm as one op),
    6. embeddings_fp16 (config.embeddings_fp16).
    `config` is a qexport QuantizeConfig (only its fields are read)."""
    out: list[Pass] = []
    if choose is not None:
        out.append(_bind(fold_outlier_shift_scale, stats=stats, choose=choose, folded=folded))
    out.append(_bind(replace_linear, quantizer=quantizer, packed_out=packed_out))
    if stack:
        out.extend([fuse_shared_input, pack_qkv])
    if config.fused_attention is not False:
        out.extend(contrib_passes())
    if config.embeddings_fp16:
        out.append(embeddings_fp16)
    return out


def contrib_passes() -> list[Pass]:
    """The fusions into ONNX Runtime's contrib ops that any float graph takes where the
    runtime has them (build_passes adds them; the fp32 baselines run them too, so that ratios
    to fp32 compare like with like)."""
    return [fuse_skip_norm]


__all__ = ["PassManager", "PassResult", "build_passes", "contrib_passes",
           "fold_outlier_shift_scale", "replace_linear", "fuse_shared_input", "pack_qkv", "fuse_skip_norm",
           "embeddings_fp16"]
