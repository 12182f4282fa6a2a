"""The public API: `quantize` a module into a rewritten graph, then `export` it.

    qm = quantize(module, example_inputs, calib_batches, QuantizeConfig())
    export(qm, "out/model.onnx")

`qexport.pipeline.run` is the whole out/-folder job of the CLI on top of these, with the same
defaults (qexport/config.py).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Callable, Iterable

import torch

import passes

from . import families
from . import graph as G
from .calibrate import collect_linear_input_stats
from .config import LearnConfig, QuantizeConfig
from .contract import META_OS_FOLDED
from .e2e import NotLogits, tune_end_to_end
from .errors import QexportError, stage
from .families.attention import why_not_fused
from .gptq import linear_input_hessians, refine_codes
from .onnx_export import export_onnx, metadata, trace
from .outlier import choose_shift_scale, search_shift_scale
from .ptq161 import learn_mixed_weights
from . import ops
from .ops.matmul_nbits import from_mixed
from .quantizers import quantize_linear, select_salient

__all__ = ["QuantizeConfig", "LearnConfig", "QuantizedModel", "quantize", "export",
           "export_with_past", "rebuild", "past_names"]


@dataclasses.dataclass
class QuantizedModel:
    graph_module: torch.fx.GraphModule  # the rewritten graph (qexport ops, packed buffers)
    example_inputs: tuple
    config: QuantizeConfig
    packed: dict  # layer name -> packed weights (qexport.ops classes)
    fp_weights: dict[str, tuple[torch.Tensor, torch.Tensor | None]]  # after OS+, before quant
    stats: dict  # layer name -> qexport.outlier.OutlierStats of its input
    timings: dict[str, float]
    notes: dict[str, list[str]]
    # original name -> graph attribute (= ONNX initializer) of the tensors the graph holds in
    # place of the model's, outside packed weights: OS+-folded ones (norm γ/β, fp Linears) and
    # end-to-end tuned norm weights; `qexport eval` and the KV-cache export reapply them
    folded: dict[str, str] = dataclasses.field(default_factory=dict)
    family: str = families.GENERIC.name


def fused_attention(config: QuantizeConfig) -> bool:
    """Whether attention is swapped for single ops while tracing (None: on)."""
    return config.fused_attention is not False


def quantize(module: torch.nn.Module, example_inputs: tuple, calib_batches: Iterable[tuple],
             config: QuantizeConfig | None = None,
             progress: Callable[[str], None] | None = None,
             checkpoint_dir: str | os.PathLike | None = None,
             tune_batches: Iterable[tuple] | None = None) -> QuantizedModel:
    """Trace `module`, calibrate, then run the passes (passes.build_passes): OS+ fold
    (optional), Linears replaced by qexport ops (PTQ1.61-learned or closed form), stacking,
    fp16 embeddings. `checkpoint_dir`: a work folder where PTQ1.61 learning keeps each finished
    block, and resumes from (qexport.checkpoint). `tune_batches`: the sequences end-to-end
    tuning reads (config.e2e.n_samples of them per epoch; default: the calibration batches)."""
    config = config or QuantizeConfig()
    config.validate()
    say = progress or (lambda msg: None)
    timings: dict[str, float] = {}
    batches = list(calib_batches)
    original = module  # the fp model: end-to-end tuning's teacher
    if config.preprocess is not None:
        t0 = time.perf_counter()
        say(f"preprocessing: {getattr(config.preprocess, '__name__', 'preprocess')}")
        with stage("quantization preprocessing"):
            module = config.preprocess(module, batches, say)
        timings["preprocess"] = time.perf_counter() - t0
    family = families.detect(module)
    if config.skip is None:
        config = dataclasses.replace(config, skip=family.skip_pattern)
    t0 = time.perf_counter()
    say(f"tracing with torch.export ({family.name} family)")
    with stage("tracing the model with torch.export"):
        gm = trace(module, example_inputs,
                   swap=family.swap_attention if fused_attention(config) else None)
    timings["trace"] = time.perf_counter() - t0
    attention_note = _attention_path(gm, module, family, config)

    t0 = time.perf_counter()
    say(f"calibrating on {len(batches)} batches")
    searching = config.outlier_suppression and config.os_quantile is None
    with stage("calibration"):
        stats = collect_linear_input_stats(
            gm, batches, progress=lambda i: say(f"calibration batch {i}/{len(batches)}"),
            sample_tokens=config.os_sample_tokens if searching else 0)
    timings["calibrate"] = time.perf_counter() - t0

    check = _runs_check(example_inputs)
    with stage("running the traced graph"):
        check("trace", gm)
    quantizer = _Quantizer(module, batches, stats, config, say, timings, checkpoint_dir,
                           teacher=original,
                           tune_batches=None if tune_batches is None else list(tune_batches))
    packed: dict = {}
    choose = _os_choose(config) if config.outlier_suppression else None
    manager = passes.PassManager(passes.build_passes(
        config, quantizer, choose=choose, stats=stats, folded=quantizer.folded,
        packed_out=packed), check=check)
    say("rewriting the graph: " + ", ".join(p.__name__ for p in manager.passes))
    with stage("rewriting the graph"):
        gm = manager(gm).graph_module
    timings.update({f"pass:{k}": v for k, v in manager.timings.items()})
    # learning and the head's Hessian ran inside replace_linear (prepare): counted apart
    timings["pass:replace_linear"] -= quantizer.prepare_seconds
    notes = {"attention": [attention_note], **manager.notes}
    if quantizer.notes:
        notes["learn_scales"] = quantizer.notes
    if not packed:
        raise QexportError("the model has no Linear layers to quantize "
                           f"(none outside the skip pattern {config.skip!r})")
    kept = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    return QuantizedModel(gm, example_inputs, config, packed, quantizer.fp_weights, stats,
                          timings, notes,
                          {k: a for k, a in quantizer.folded.items() if a in kept}, family.name)


class _Quantizer:
    """The quantizer handed to passes.replace_linear. `prepare(gm)` (after the OS+ fold, whose
    pass fills `folded`) learns the PTQ1.61 scales and the head's Hessian on the eager module
    with the folded tensors in place; each call then packs one Linear with its scheme."""

    def __init__(self, module, batches, stats, config: QuantizeConfig, say, timings,
                 checkpoint_dir=None, teacher=None, tune_batches=None):
        self.module, self.batches, self.stats = module, batches, stats
        self.tune_batches = batches if tune_batches is None else tune_batches
        self.checkpoint_dir = checkpoint_dir
        self.teacher = module if teacher is None else teacher  # the fp model, not preprocessed
        self.config, self.say, self.timings = config, say, timings
        self.folded: dict[str, str] = {}  # original tensor name -> its attribute in gm
        self.fp_weights: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.learned: dict = {}
        self.tuned_tensors: dict[str, torch.Tensor] = {}  # end-to-end tuned norm weights
        self.hessians: dict[str, torch.Tensor] = {}
        self.notes: list[str] = []
        self.prepare_seconds = 0.0

    def prepare(self, gm: torch.fx.GraphModule) -> None:
        t0 = time.perf_counter()
        for st in self.stats.values():
            st.sample = None  # only the OS+ search needed them
        with folded_into(self.module, {k: getattr(gm, a) for k, a in self.folded.items()}):
            with stage("PTQ1.61 learning"):
                self.learned = self._learn()
            with stage("the head's Hessian (GPTQ)"):
                self.hessians = self._head_hessians()
        self._install_tuned(gm)
        self.prepare_seconds = time.perf_counter() - t0

    def _install_tuned(self, gm: torch.fx.GraphModule) -> None:
        """The norm weights end-to-end tuning trained, in the graph in place of the model's (or
        of their OS+-folded values), recorded in `folded` like OS+'s, so that the KV-cache
        export and `qexport eval` rebuild the graph with them."""
        if not self.tuned_tensors:
            return
        nodes = {n.target: n for n in gm.graph.nodes if n.op == "get_attr"}
        for name, value in self.tuned_tensors.items():
            node = nodes.get(self.folded.get(name, name))
            if node is None:
                raise QexportError(f"end-to-end tuning trained {name}, which the traced graph "
                                   "does not read")
            G.set_tensor(gm, node, value, f"qexport_e2e_{name}")
            self.folded[name] = node.target

    def __call__(self, name, weight, bias):
        chosen = self.config.scheme_for(name)
        if chosen is None or name not in self.stats:
            return None
        self.fp_weights[name] = (weight.detach().float().clone(),
                                 None if bias is None else bias.detach().float().clone())
        if name in self.learned:
            return self.learned[name]
        with stage(f"quantizing {name} {tuple(weight.shape)}"):
            packed = quantize_linear(chosen, weight, bias, self.stats[name])
            if name in self.hessians:
                packed = refine_codes(packed, weight, self.hessians[name])
            if self.config.standard_ops and chosen.kind == "mixed":
                packed = from_mixed(packed)  # the same codes as ONNX Runtime's MatMulNBits
        return packed

    def _learn(self) -> dict:
        """PTQ1.61 learned scales for the Linears of the main scheme (empty for closed form,
        and for models whose transformer blocks can't be found, e.g. a flat .pt2 graph:
        noted). Salient channels come from `stats`, i.e. after OS+ when it was folded."""
        config = self.config
        if config.method != "ptq161" or config.scheme.kind != "mixed" or \
                config.scheme.salient_ratio >= 1.0:
            return {}  # nothing binary to learn scales for
        try:
            blocks = families.find_blocks(self.module)
        except QexportError as e:
            msg = f"PTQ1.61 learning skipped, closed-form scales used: {e}"
            self.say(msg)
            self.notes.append(msg)
            return {}
        t0 = time.perf_counter()
        salient = {name: select_salient(st.rms, config.scheme.salient_ratio)
                   for name, st in self.stats.items() if not config.is_head(name)}
        calib_ids = torch.cat([b[0] for b in self.batches])
        learned = learn_mixed_weights(self.module, calib_ids, salient,
                                      config.scheme.salient_group_size,
                                      config.learn or LearnConfig.preset("default"),
                                      progress=self.say, include=lambda name: name in salient,
                                      blocks=blocks, checkpoint_dir=self.checkpoint_dir)
        self.timings["learn_scales"] = time.perf_counter() - t0
        if config.e2e is not None and learned:
            t0 = time.perf_counter()
            try:
                tune_ids = torch.cat([b[0] for b in self.tune_batches])
                tuned = tune_end_to_end(self.module, learned, tune_ids, config.e2e,
                                        progress=self.say, teacher=self.teacher,
                                        checkpoint_dir=self.checkpoint_dir)
            except NotLogits as e:
                msg = f"end-to-end tuning skipped: {e}"
                self.say(msg)
                self.notes.append(msg)
                return learned
            learned, self.tuned_tensors = tuned.packed, tuned.tensors
            self.timings["e2e_tune"] = time.perf_counter() - t0
        return learned

    def _head_hessians(self) -> dict[str, torch.Tensor]:
        """H of the input of each skipped Linear that head_scheme quantizes all-4-bit (the
        head), for its GPTQ codes; {} when there is none, or no such nn.Linear in the module
        (a flat .pt2 graph: the head keeps round-to-nearest codes)."""
        config = self.config
        if not config.head_gptq or config.head_scheme is None or \
                config.head_scheme.kind != "mixed" or config.head_scheme.salient_ratio < 1.0:
            return {}
        heads = {name for name in self.stats if config.is_head(name)}
        if not heads:
            return {}
        t0 = time.perf_counter()
        self.say(f"GPTQ codes for the 4-bit head: its input Hessian over {len(self.batches)} "
                 "batches")
        hessians = linear_input_hessians(self.module, torch.cat([b[0] for b in self.batches]),
                                         include=heads.__contains__)
        self.timings["head_hessian"] = time.perf_counter() - t0
        return hessians


def _attention_path(gm, module, family, config: QuantizeConfig) -> str:
    """Which path the attention blocks took, and why (for the report)."""
    from .ops import group_query_attention as gqa

    fused = sum(1 for n in gm.graph.nodes if n.op == "call_function" and
                n.target == gqa.SPEC.torch_op)
    try:
        blocks = len(families.find_blocks(module)[1]) if family.attention_swap else 0
    except QexportError:
        blocks = 0
    if fused:
        rest = f" (the rest traced: {why_not_fused(module)})" if fused < blocks else ""
        return (f"{fused} of {blocks or fused} attention blocks fused into ONNX Runtime's "
                f"GroupQueryAttention{rest}")
    if not fused_attention(config):
        return "traced ops: fused attention off (--no-fused-attention, or the target's default)"
    if family.attention_swap is None:
        return f"traced ops: {family.traced_attention} (family {family.name})"
    why = why_not_fused(module) or "no attention block matched the fused op's contract"
    return f"traced ops: {why}"


def _os_choose(config: QuantizeConfig):
    """OS+ `choose` for the fold pass: the fixed quantile, or the grid search of t on the
    closed-form quantization error of the outputs of the Linears each norm feeds, under their
    scheme (salient channels re-selected, activation ranges re-measured, on the scaled
    activation)."""
    if config.os_quantile is not None:
        return lambda st, shift, weights: choose_shift_scale(st, shift,
                                                             quantile=config.os_quantile)

    def error(name, weight, moved) -> float:
        chosen = config.scheme_for(name)
        if chosen is None:
            return 0.0  # stays fp: scaling it is exact
        packed = quantize_linear(chosen, weight, None, moved)
        x = moved.sample
        return float((ops.apply(x, packed) - x @ weight.float().T).square().sum())

    return lambda st, shift, weights: search_shift_scale(st, shift, weights, error,
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


def float_graph(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A traced floating-point graph (with fused attention) after the contrib-op fusions the
    quantized exports get (passes.contrib_passes): the fp32 baselines."""
    return passes.PassManager(passes.contrib_passes())(gm).graph_module


def kv_cache_unsupported(module: torch.nn.Module) -> str | None:
    """Why `export_with_past` cannot take `module`, or None (its family decides)."""
    return families.detect(module).kv_cache_reason(module)


def export_with_past(module: torch.nn.Module, qmodel: QuantizedModel | None, path: str | Path,
                     extra_metadata: dict[str, str] | None = None,
                     share_data_with: str | Path | None = None) -> list[Path]:
    """Write the model as a decoder with a KV cache (the family's `with_past` wrapper, e.g.
    families.attention.WithPast): inputs `input_ids` [B, S], `attention_mask` [B, T] (per row,
    ones for its tokens so far) and `past.{i}.key` / `past.{i}.value` [B, kv heads, P, head
    dim] per layer (P = T - S, 0 for the prompt, or a buffer of P >= T positions updated in
    place), outputs `logits` [B, 1, V] and `present.{i}.key` / `.value` [.., max(T, P), ..]
    (docs/format.md). `module` is the Hugging Face causal LM wrapper (models.CausalLMLogits)
    `qmodel` was quantized from; its graph is traced again with past inputs and gets the same
    packed weights, passes and replaced tensors (OS+ folds, tuned norm weights; qmodel None:
    the floating-point model, for baselines). Weights whose bytes are already in
    `share_data_with`'s external data file (model.onnx) are referenced there, not copied.
    Returns the files written."""
    family = families.detect(module)
    reason = family.kv_cache_reason(module)
    if reason:
        raise QexportError(f"no KV-cache export: {reason}")
    wrapper = family.with_past(module)
    kv_heads, head_dim = wrapper.cache_shape
    past = [torch.zeros(2, kv_heads, 4, head_dim)
            for _ in range(2 * len(wrapper.attention))]
    example = (torch.randint(0, 8, (2, 3)), torch.ones(2, 7, dtype=torch.int64), *past)
    if qmodel is None:
        traced = float_graph(trace(wrapper, example, swap=family.swap_attention))
        meta = {}
    else:
        gm = qmodel.graph_module
        # the decoder computes its attention with the cache: always the family's swap
        traced = rebuild(module, wrapper, example, qmodel.packed,
                         {k: getattr(gm, a) for k, a in qmodel.folded.items()},
                         dataclasses.replace(qmodel.config, fused_attention=True))
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
            packed: dict, folded: dict[str, torch.Tensor], config: QuantizeConfig,
            stack: bool = True) -> torch.fx.GraphModule:
    """The quantized graph again from packed weights, without quantizing: `traced` (`module`
    itself, or a wrapper around it such as a KV-cache decoder) traced with `module`'s
    replaced tensors (OS+ folds, tuned norm weights) in place, then the passes of `config`
    with `packed` (keyed by layer name) as the quantizer, stacking where ops share an input
    (`stack`). Used by `qexport eval` (from a file's weights) and `export_with_past`."""
    family = families.detect(module)
    with folded_into(module, folded):  # the graph keeps the folded tensors
        gm = trace(traced, example_inputs,
                   swap=family.swap_attention if fused_attention(config) else None)
    used: dict = {}
    manager = passes.PassManager(passes.build_passes(
        config, lambda name, w, b: packed.get(name), packed_out=used, stack=stack))
    gm = manager(gm).graph_module
    if len(used) != len(packed):
        raise QexportError(f"the model has {len(used)} of the {len(packed)} quantized layers: "
                           "is it the model they were made from?")
    return gm


def past_names(prefix: str, layers) -> list[str]:
    """`{prefix}.{i}.key`, `{prefix}.{i}.value` for each layer i: the KV-cache inputs
    ("past") and outputs ("present") of `export_with_past`."""
    return [f"{prefix}.{i}.{kind}" for i in layers for kind in ("key", "value")]
