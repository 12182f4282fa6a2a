"""The public API: `quantize` a module into a rewritten graph, then `export` it."""
from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path
from typing import Callable, Iterable

import torch

import passes
from passes import OutlierStats

from .calibrate import collect_linear_input_stats
from .contract import META_OS_FOLDED
from .onnx_export import export_onnx, metadata, trace
from .packing import MixedLinearWeights
from .quantizers import quantize_mixed, select_salient
from .errors import QexportError
from .gptq import linear_input_hessians, refine_codes
from .ptq161 import LearnConfig, find_blocks, learn_mixed_weights
from .schemes import Scheme

METHODS = ("closed-form", "ptq161")

# Linears kept in floating point by default: the output head and embeddings-like projections.
DEFAULT_SKIP = r"(^|\.)(lm_head|embed_out|output|classifier|score|embed_tokens)$"


@dataclasses.dataclass
class QuantizeConfig:
    scheme: Scheme
    outlier_suppression: bool = False
    os_quantile: float | None = None  # None: search t (OS+); else t = this half-range quantile
    os_grid: int = 20  # candidates of t in the search
    os_sample_tokens: int = 512  # calibration tokens kept per norm output for the search
    skip: str = DEFAULT_SKIP
    head_scheme: Scheme | None = None  # quantize the skipped Linears (output head) with this
    # An all-4-bit head_scheme (w4a16) gets GPTQ codes on its RTN grid (qexport/gptq.py), from
    # the head input's Hessian over the calibration batches (one more forward pass)
    head_gptq: bool = True
    embeddings_fp16: bool = False
    # Llama attention blocks as one com.microsoft GroupQueryAttention node each
    # (qexport/attention.py); TensorRT cannot parse it
    fused_attention: bool = True
    method: str = "closed-form"  # or "ptq161": learned block-wise scales (qexport/ptq161.py)
    learn: "LearnConfig | None" = None  # PTQ1.61 settings (None: the default preset)
    # Quantization preprocessing (PTQ1.61's restorative LoRA is one): preprocess(module,
    # calib_batches) -> the module to quantize, run before tracing; see docs/design.md
    preprocess: Callable[[torch.nn.Module, list[tuple]], torch.nn.Module] | None = None

    def is_head(self, layer_name: str) -> bool:
        """Whether a Linear is one the --skip pattern keeps out of the main scheme."""
        return bool(self.skip) and re.search(self.skip, layer_name) is not None

    def as_dict(self) -> dict:
        return {"scheme": self.scheme.label, "salient_ratio": self.scheme.salient_ratio,
                "salient_group_size": self.scheme.salient_group_size,
                "outlier_suppression": self.outlier_suppression,
                "os_quantile": self.os_quantile,
                "os_grid": self.os_grid if self.os_quantile is None else None,
                "skip": self.skip,
                "head_scheme": self.head_scheme.label if self.head_scheme else None,
                "head_gptq": self.head_gptq if self.head_scheme else None,
                "embeddings_fp16": self.embeddings_fp16, "method": self.method,
                "fused_attention": self.fused_attention,
                "learn": self.learn.as_dict() if self.method == "ptq161" and self.learn else None,
                "preprocess": getattr(self.preprocess, "__name__", repr(self.preprocess))
                if self.preprocess else None}


@dataclasses.dataclass
class QuantizedModel:
    graph_module: torch.fx.GraphModule  # the rewritten graph (qexport ops, packed buffers)
    example_inputs: tuple
    config: QuantizeConfig
    packed: dict[str, MixedLinearWeights]
    fp_weights: dict[str, tuple[torch.Tensor, torch.Tensor | None]]  # after OS+, before quant
    stats: dict[str, OutlierStats]
    timings: dict[str, float]
    notes: dict[str, list[str]]
    # OS+: original name -> graph attribute (= ONNX initializer) of the folded tensors that
    # are not inside packed weights (norm γ/β, fp Linears); `qexport eval` reapplies them
    folded: dict[str, str] = dataclasses.field(default_factory=dict)


def quantize(module: torch.nn.Module, example_inputs: tuple, calib_batches: Iterable[tuple],
             config: QuantizeConfig,
             progress: Callable[[str], None] | None = None) -> QuantizedModel:
    """Trace `module`, calibrate, fold OS+ (optional) and replace Linears by qexport ops."""
    say = progress or (lambda msg: None)
    timings: dict[str, float] = {}
    batches = list(calib_batches)
    if config.preprocess is not None:
        t0 = time.perf_counter()
        say(f"preprocessing: {getattr(config.preprocess, '__name__', 'preprocess')}")
        module = config.preprocess(module, batches)
        timings["preprocess"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    say("tracing with torch.export")
    gm = trace(module, example_inputs, fused_attention=config.fused_attention)
    timings["trace"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    say(f"calibrating on {len(batches)} batches")
    searching = config.outlier_suppression and config.os_quantile is None
    stats = collect_linear_input_stats(
        gm, batches, progress=lambda i: say(f"calibration batch {i}/{len(batches)}"),
        sample_tokens=config.os_sample_tokens if searching else 0)
    timings["calibrate"] = time.perf_counter() - t0

    check = _runs_check(example_inputs)
    check("trace", gm)
    notes: dict[str, list[str]] = {}

    def run_passes(pipeline):
        manager = passes.PassManager(pipeline, check=check)
        say("rewriting the graph: " + ", ".join(p.__name__ for p in pipeline))
        result = manager(gm).graph_module
        timings.update({f"pass:{k}": v for k, v in manager.timings.items()})
        notes.update(manager.notes)
        return result

    # 1. OS+ on the graph; `folded` lets the eager model used for learning follow it
    folded: dict[str, str] = {}  # original tensor name -> its attribute in gm
    if config.outlier_suppression:
        choose = _os_search(config) if searching else (
            lambda st, shift, weights: passes.choose_shift_scale(st, shift,
                                                                 quantile=config.os_quantile))

        def fold_outlier_shift_scale(g):
            return passes.fold_outlier_shift_scale(g, stats, choose=choose, folded=folded)
        gm = run_passes([fold_outlier_shift_scale])
        for st in stats.values():
            st.sample = None  # only the search needed them

    # 2. PTQ1.61 learning on the eager module (with the folded tensors)
    notes_learn: list[str] = []
    with folded_into(module, {k: getattr(gm, a) for k, a in folded.items()}):
        learned = _learn(module, batches, stats, config, say, timings, notes_learn)
        head_hessians = _head_hessians(module, batches, stats, config, say, timings)
    if notes_learn:
        notes["learn_scales"] = notes_learn

    # 3. Linears -> qexport ops
    fp_weights: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    scheme = config.scheme

    def quantizer(name, weight, bias):
        chosen = config.head_scheme if config.is_head(name) else scheme
        if chosen is None or name not in stats:
            return None
        fp_weights[name] = (weight.detach().float().clone(),
                            None if bias is None else bias.detach().float().clone())
        if name in learned:
            return learned[name]
        salient = select_salient(stats[name].rms, chosen.salient_ratio)
        packed = quantize_mixed(weight, bias, salient, chosen.salient_group_size)
        if name in head_hessians:
            packed = refine_codes(packed, weight, head_hessians[name])
        return packed

    packed: dict[str, MixedLinearWeights] = {}

    def replace_linear(g):
        return passes.replace_linear(g, quantizer, packed)
    gm = run_passes([replace_linear, passes.fuse_shared_input]
                    + ([passes.embeddings_fp16] if config.embeddings_fp16 else []))
    if not packed:
        raise QexportError("the model has no Linear layers to quantize "
                           f"(none outside the skip pattern {config.skip!r})")
    kept = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    return QuantizedModel(gm, example_inputs, config, packed, fp_weights, stats, timings, notes,
                          {k: a for k, a in folded.items() if a in kept})


def _os_search(config: QuantizeConfig):
    """OS+ `choose` that grid-searches t on the closed-form quantization error of the Linears
    each norm feeds (their scheme, salient channels re-selected on the scaled activation)."""
    def error(name, weight, moved) -> float:
        chosen = config.head_scheme if config.is_head(name) else config.scheme
        if chosen is None:
            return 0.0  # stays fp: scaling it is exact
        salient = select_salient(moved.rms, chosen.salient_ratio)
        dq = quantize_mixed(weight, None, salient, chosen.salient_group_size).dequantize()
        return float((moved.sample @ (dq - weight).T).square().sum())

    return lambda st, shift, weights: passes.search_shift_scale(st, shift, weights, error,
                                                                grid=config.os_grid)


class folded_into:
    """Context manager: `module`'s tensors replaced by the OS+-folded ones (keyed by their
    names in the traced module, which are the module's own), restored on exit. A folded bias
    the module lacks is added for the duration."""

    def __init__(self, module: torch.nn.Module, folded: dict[str, torch.Tensor]):
        self.module, self.folded, self.saved = module, folded, []

    def __enter__(self):
        for name, value in self.folded.items():
            owner_name, _, attr = name.rpartition(".")
            try:
                owner = self.module.get_submodule(owner_name)
            except AttributeError:
                owner = None
            if owner is None or not hasattr(owner, attr):
                self.__exit__()
                raise QexportError(f"OS+ folded {name}, which the eager model does not have: "
                                   "OS+ and PTQ1.61 learning cannot be combined for this model")
            old = getattr(owner, attr)
            self.saved.append((owner, attr, old))
            new = value.detach().clone()
            if isinstance(old, torch.nn.Parameter) or old is None:
                new = torch.nn.Parameter(new, requires_grad=False)
            setattr(owner, attr, new)
        return self.module

    def __exit__(self, *exc):
        for owner, attr, old in reversed(self.saved):
            setattr(owner, attr, old)
        self.saved = []
        return False


def _learn(module, batches, stats, config: QuantizeConfig, say, timings, notes) -> dict:
    """PTQ1.61 learned scales for the Linears of the main scheme (empty for closed form, and
    for models whose transformer blocks can't be found, e.g. a flat .pt2 graph: noted).
    Salient channels come from `stats`, i.e. after OS+ when it was folded."""
    if config.method not in METHODS:
        raise QexportError(f"unknown method {config.method!r}; choose from {', '.join(METHODS)}")
    if config.method != "ptq161" or config.scheme.salient_ratio >= 1.0:
        return {}  # nothing binary to learn scales for
    try:
        find_blocks(module)
    except QexportError as e:
        msg = f"PTQ1.61 learning skipped, closed-form scales used: {e}"
        say(msg)
        notes.append(msg)
        return {}
    t0 = time.perf_counter()
    salient = {name: select_salient(st.rms, config.scheme.salient_ratio)
               for name, st in stats.items() if not config.is_head(name)}
    calib_ids = torch.cat([b[0] for b in batches])
    learned = learn_mixed_weights(module, calib_ids, salient, config.scheme.salient_group_size,
                                  config.learn or LearnConfig.preset("default"), progress=say,
                                  include=lambda name: name in salient)
    timings["learn_scales"] = time.perf_counter() - t0
    return learned


def _head_hessians(module, batches, stats, config: QuantizeConfig, say, timings
                   ) -> dict[str, torch.Tensor]:
    """H of the input of each skipped Linear that head_scheme quantizes all-4-bit (the head),
    for its GPTQ codes; {} when there is none, or no such nn.Linear in `module` (a flat .pt2
    graph: the head keeps round-to-nearest codes)."""
    if not config.head_gptq or config.head_scheme is None or \
            config.head_scheme.salient_ratio < 1.0:
        return {}
    heads = {name for name in stats if config.is_head(name)}
    if not heads:
        return {}
    t0 = time.perf_counter()
    say(f"GPTQ codes for the 4-bit head: its input Hessian over {len(batches)} batches")
    hessians = linear_input_hessians(module, torch.cat([b[0] for b in batches]),
                                     include=heads.__contains__)
    timings["head_hessian"] = time.perf_counter() - t0
    return hessians


def _runs_check(example_inputs):
    """After each pass the graph must still run and keep its output shapes."""
    reference_shapes = {}

    def check(name, gm):
        with torch.no_grad():
            out = gm(*example_inputs)
        shapes = [tuple(t.shape) for t in torch.utils._pytree.tree_leaves(out)
                  if isinstance(t, torch.Tensor)]
        if "shapes" in reference_shapes and reference_shapes["shapes"] != shapes:
            raise RuntimeError(f"pass {name} changed the output shapes "
                               f"{reference_shapes['shapes']} -> {shapes}")
        reference_shapes["shapes"] = shapes
    return check


def export(qmodel: QuantizedModel, path: str | Path, extra_metadata: dict[str, str] | None = None,
           input_names: list[str] | None = None,
           output_names: list[str] | None = None) -> list[Path]:
    """Write the quantized graph as ONNX; returns the files written."""
    meta = metadata(qmodel.config.scheme.label, qmodel.config.as_dict())
    if qmodel.folded:
        meta[META_OS_FOLDED] = json.dumps(qmodel.folded, sort_keys=True)
    meta.update(extra_metadata or {})
    t0 = time.perf_counter()
    files = export_onnx(qmodel.graph_module, qmodel.example_inputs, Path(path), meta,
                        input_names=input_names, output_names=output_names,
                        dim_names={"input_ids": ["batch", "sequence"]})
    qmodel.timings["export"] = time.perf_counter() - t0
    return files


def export_with_past(module: torch.nn.Module, qmodel: QuantizedModel | None, path: str | Path,
                     extra_metadata: dict[str, str] | None = None,
                     share_data_with: str | Path | None = None) -> list[Path]:
    """Write the model as a decoder with a KV cache (`attention.WithPast`): inputs
    `input_ids` [B, S], `attention_mask` [B, T] (per row, ones for its tokens so far) and
    `past.{i}.key` / `past.{i}.value` [B, kv heads, P, head dim] per layer (P = T - S, 0 for
    the prompt, or a buffer of P >= T positions updated in place), outputs `logits` [B, 1, V]
    and `present.{i}.key` / `.value` [.., max(T, P), ..] (docs/format.md).
    `module` is the Hugging Face causal LM wrapper (models.CausalLMLogits) `qmodel` was
    quantized from; its graph is traced again with past inputs and gets the same packed
    weights, passes and OS+-folded tensors (qmodel None: the floating-point model, for
    baselines). Weights whose bytes are already in `share_data_with`'s external data file
    (model.onnx) are referenced there, not copied. Returns the files written."""
    from .attention import WithPast

    reason = kv_cache_unsupported(module)
    if reason:
        raise QexportError(f"no KV-cache export: {reason}")
    wrapper = WithPast(module.model)
    cfg = module.model.config
    head_dim = wrapper.attention[0].head_dim
    past = [torch.zeros(2, cfg.num_key_value_heads, 4, head_dim)
            for _ in range(2 * len(wrapper.attention))]
    example = (torch.randint(0, 8, (2, 3)), torch.ones(2, 7, dtype=torch.int64), *past)
    if qmodel is None:
        traced = trace(wrapper, example)
        meta = {}
    else:
        gm = qmodel.graph_module
        traced = rebuild(module, wrapper, example, qmodel.packed,
                         {k: getattr(gm, a) for k, a in qmodel.folded.items()},
                         qmodel.config.embeddings_fp16)
        meta = metadata(qmodel.config.scheme.label, qmodel.config.as_dict())
    meta.update(extra_metadata or {})
    layers = range(len(wrapper.attention))
    auto = torch.export.Dim.AUTO
    return export_onnx(traced, example, Path(path), meta,
                       input_names=["input_ids", "attention_mask"] + past_names("past", layers),
                       output_names=["logits"] + past_names("present", layers),
                       share_data_with=share_data_with,
                       # batch and lengths vary; kv heads and head dim are the model's
                       dynamic_shapes=({0: auto, 1: auto}, {0: auto, 1: auto},
                                       *({0: auto, 2: auto} for _ in past)),
                       dim_names={"input_ids": ["batch", "sequence"],
                                  "attention_mask": ["batch", "total_sequence"],
                                  **{name: ["batch", None, "past_sequence"]
                                     for name in past_names("past", layers)}})


def rebuild(module: torch.nn.Module, traced: torch.nn.Module, example_inputs: tuple,
            packed: dict[str, MixedLinearWeights], folded: dict[str, torch.Tensor],
            embeddings_fp16: bool, stack: bool = True) -> torch.fx.GraphModule:
    """The quantized graph again from packed weights, without quantizing: `traced` (`module`
    itself, or a wrapper around it such as attention.WithPast) traced with `module`'s
    OS+-folded tensors in place, then its Linears replaced by `packed` (keyed by layer name),
    stacked where they share an input (`stack`) and the embedding tables in fp16 if asked.
    Used by `qexport eval` (from a file's weights) and `export_with_past`."""
    with folded_into(module, folded):  # the graph keeps the folded tensors
        gm = trace(traced, example_inputs)
    used: dict = {}
    gm = passes.replace_linear(gm, lambda name, w, b: packed.get(name), used).graph_module
    if len(used) != len(packed):
        raise QexportError(f"the model has {len(used)} of the {len(packed)} quantized layers: "
                           "is it the model they were made from?")
    if stack:
        gm = passes.fuse_shared_input(gm).graph_module
    if embeddings_fp16:
        gm = passes.embeddings_fp16(gm).graph_module
    gm.recompile()
    return gm


def kv_cache_unsupported(module: torch.nn.Module) -> str | None:
    """Why `export_with_past` cannot take `module`, or None."""
    from .attention import WithPast

    hf = getattr(module, "model", None)
    cfg = getattr(hf, "config", None)
    if hf is None or cfg is None or not all(hasattr(hf, a) for a in ("model", "lm_head")):
        return "it needs a Hugging Face causal LM (a decoder stack `.model` and `.lm_head`)"
    n = len(WithPast(hf).attention)
    if n == 0 or n != getattr(cfg, "num_hidden_layers", -1):
        return (f"{n} of its attention blocks are supported by the fused attention (Llama, "
                "Mistral, Qwen2 without a sliding window, head size a multiple of 16); it "
                "needs all of them")
    return None


def past_names(prefix: str, layers) -> list[str]:
    """`{prefix}.{i}.key`, `{prefix}.{i}.value` for each layer i: the KV-cache inputs
    ("past") and outputs ("present") of `export_with_past`."""
    return [f"{prefix}.{i}.{kind}" for i in layers for kind in ("key", "value")]
