"""The settings of a qexport run, declared once: the CLI's defaults are these defaults.

`QuantizeConfig` (how to quantize: scheme, method, head, embeddings, OS+) and `LearnConfig`
(PTQ1.61 learning) configure `qexport.quantize`; `RunConfig` is the whole out/-folder job of
`qexport.pipeline.run` (model, data, target, checks), holding a QuantizeConfig. No heavy
import here: building the CLI parser reads these defaults.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

from .errors import QexportError
from .schemes import Scheme, default_head_scheme, parse_scheme

METHODS = ("ptq161", "closed-form")
DEFAULT_SCHEME = "w1.61a16"
AUTO = "auto"  # a setting decided by the scheme (head_scheme, outlier_suppression, standard_ops)

# Linears kept out of the main scheme by default (the --skip pattern): output heads and
# embedding-like projections, by their last name component.
HEAD_NAMES = ("lm_head", "embed_out", "output", "classifier", "score", "embed_tokens")


def head_pattern(names=HEAD_NAMES) -> str:
    return r"(^|\.)(" + "|".join(map(re.escape, names)) + r")$"


DEFAULT_SKIP = head_pattern()

# Quantization budgets (--preset), the first the default. Each gives the settings of its stages
# that differ from the dataclass defaults: "learn" (LearnConfig: PTQ1.61's block-wise learning),
# "lora" (LoRAConfig: restorative LoRA before it; absent: none), "e2e" (E2EConfig: end-to-end
# tuning after it; absent: none). Measured on SmolLM2 in docs/results.md.
# default: one epoch of block-wise learning, then one of end-to-end tuning (SmolLM2: 234.1 in
# 15.5 min of these stages, 18.3 of quantization through the CLI; against 231.5 with two
# epochs of learning in 19.3 and 357.4 with two and none), one r2 per activation so that
# q/k/v and gate/up stack (240.5 against 237.1 on 20k tokens through the CLI, for 7-19 % less
# time per decoded token);
# best: restorative LoRA first, the paper's two epochs and one r2 per Linear, then end-to-end
# tuning over 192 sequences of the calibration text (3x the default 64 calibration rows):
# accuracy first.
PRESETS = {
    "default": {"learn": {"epochs": 1, "lr_alpha": 2e-2, "lr_r1": 2e-2, "lr_r2": 2e-2,
                          "share_r2": True},
                "e2e": {}},
    "fast": {"learn": {"n_samples": 16, "epochs": 1, "lr_alpha": 3e-2, "lr_r1": 3e-2,
                       "lr_r2": 3e-2, "share_r2": True}},
    "best": {"learn": {}, "lora": {}, "e2e": {"n_samples": 192}},
}


def _preset(cls, stage: str, name: str, overrides: dict):
    if name not in PRESETS:
        raise QexportError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    if stage not in PRESETS[name]:
        return None
    return dataclasses.replace(cls(**PRESETS[name][stage]), **overrides)


@dataclasses.dataclass
class LearnConfig:
    """Settings of the block-wise learning (AdamW, weight decay 0)."""
    epochs: int = 2
    # Steps on a = α/α0, r1, r2 (all relative, start at 1). Tuned on SmolLM2 (docs/results.md):
    # 2e-3 left most of the gain unrealised; fewer steps (the fast preset) want larger ones.
    lr_alpha: float = 1e-2
    lr_r1: float = 1e-2
    lr_r2: float = 1e-2
    weight_decay: float = 0.0
    n_samples: int | None = None  # None: every row of calib_ids
    batch_size: int = 1  # calibration sequences per optimizer step
    mse_weight: float = 1.0  # weight of both MSE terms
    cos_weight: float = 1.0  # weight of both −log cos terms
    # "token": each token's squared error relative to its target's squared norm, averaged
    # over tokens, so that the few tokens with massive hidden states (attention sinks) do not
    # dominate the loss (ptq161.block_loss; SmolLM2: 357.4 against 371.9, docs/results.md);
    # "mean": the MSE over every element, the paper's
    mse_norm: str = "token"
    seed: int = 0
    spill_dir: str | None = None  # keep activations in memory-mapped files there (large runs)
    # One r2 for the Linears of a block that read the same activation with the same salient
    # channels (q/k/v, gate/up), so that the exported ops stack into one
    # (passes.fuse_shared_input). On SmolLM2: 7-19 % less time per decoded token, 3.2 % higher
    # perplexity after learning alone, 1.4 % after end-to-end tuning (docs/results.md): on in
    # the default and fast presets, off in best and here (the paper's one r2 per Linear).
    share_r2: bool = False

    @classmethod
    def preset(cls, name: str, **overrides) -> "LearnConfig":
        """The block-wise learning of a --preset (PRESETS): "default" one epoch, one r2 per
        activation; "fast" 16 rows, one epoch; "best" the paper's two epochs."""
        return _preset(cls, "learn", name, overrides)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class LoRAConfig:
    """Restorative LoRA, PTQ1.61's quantization preprocessing (qexport/preprocess.py). The
    paper: rank 64, ~20k steps on RedPajama; the defaults fit a small model on a laptop-class
    CPU (one pass over the calibration rows)."""
    rank: int = 64
    alpha: float = 64.0  # the adapter is (alpha / rank)·B·A
    epochs: int = 1
    lr: float = 1e-3
    n_samples: int | None = None  # None: every calibration row
    salient_ratio: float = 0.2  # of the fake quantization (the scheme's, when run by the CLI)
    seed: int = 0
    log_every: int = 8

    @classmethod
    def preset(cls, name: str, **overrides) -> "LoRAConfig | None":
        """The restorative LoRA of a --preset (None: the preset has none)."""
        return _preset(cls, "lora", name, overrides)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class E2EConfig:
    """End-to-end tuning after the block-wise learning (qexport/e2e.py): AdamW with a cosine
    schedule on the continuous parameters of every packed Linear, KL to the fp model."""
    epochs: int = 1
    # Relative steps on the scales (row, r2, salient), offsets and norm weights. SmolLM2, one
    # epoch: 276.8 at 1e-3, 246.1 at 3e-3, 231.5 at 1e-2 with the norms (docs/results.md)
    lr_scale: float = 1e-2
    lr_bias: float = 1e-4  # absolute steps on the biases
    # Sequences per epoch (None: the calibration rows). More than the calibration rows: the
    # pipeline draws the further ones from the same calibration text (the first are the
    # calibration rows), and where the text has fewer, the ones it has repeat. On SmolLM2
    # one epoch over 192 sequences gave 191.0 where three over the 64 calibration rows, the
    # same steps, gave 225.5: the three epochs fit those 64 (docs/results.md)
    n_samples: int | None = None
    batch_size: int = 1
    train_r2: bool = True  # a shared r2 (--share-r2) trains as one factor: the ops still stack
    # The weights (γ) of the normalization layers too (e2e.norm_weights), put into the graph
    # in place of the model's
    train_norms: bool = True
    seed: int = 0
    log_every: int = 8
    # Steps between checkpoints in the run's work folder (qexport.checkpoint.E2ECheckpoint;
    # ~50 s of SmolLM2 tuning here); each writes every trained factor and AdamW's two
    # moments of it (3 floats per trained value)
    checkpoint_every: int = 8

    @classmethod
    def preset(cls, name: str, **overrides) -> "E2EConfig | None":
        """The end-to-end tuning of a --preset (None: the preset has none)."""
        return _preset(cls, "e2e", name, overrides)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class QuantizeConfig:
    scheme: Scheme = dataclasses.field(default_factory=lambda: parse_scheme(DEFAULT_SCHEME))
    _: dataclasses.KW_ONLY  # every setting after the scheme by name
    method: str = "ptq161"  # or "closed-form" (no learning: α = mean|W - μ|)
    # PTQ1.61's block-wise learning, and end-to-end tuning of the learned layers' continuous
    # parameters after it (qexport/e2e.py; None: none): the "default" preset's
    learn: LearnConfig | None = dataclasses.field(
        default_factory=lambda: LearnConfig.preset("default"))
    e2e: E2EConfig | None = dataclasses.field(
        default_factory=lambda: E2EConfig.preset("default"))
    # OS+ shift/scale folded before quantizing; "auto": on for the activation-quantized
    # schemes (w8a8, w6a6), as the OS+ paper intends, off for weight-only ones
    outlier_suppression: bool | str = AUTO
    os_quantile: float | None = None  # None: search t (OS+); else t = this half-range quantile
    os_grid: int = 20  # candidates of t in the search
    os_sample_tokens: int = 512  # calibration tokens kept per norm output for the search
    # Regex of the Linears kept out of the main scheme (they get head_scheme); None: the
    # model family's head and embedding names (qexport/families/, default HEAD_NAMES)
    skip: str | None = None
    # The scheme of the skipped Linears (the output head); None keeps them in floating point;
    # "auto": schemes.default_head_scheme (w4a16, or the main scheme when it quantizes
    # activations). An all-4-bit head_scheme (w4a16) gets GPTQ codes on its RTN grid
    # (qexport/gptq.py), from the head input's Hessian over the calibration batches
    head_scheme: Scheme | str | None = AUTO
    head_gptq: bool = True
    embeddings_fp16: bool = True  # embedding tables stored in fp16
    # Attention blocks as single runtime ops where the model's family has an attention swap
    # (qexport/families/), and residual add + RMSNorm as one (passes.fuse_skip_norm): ONNX
    # Runtime's contrib ops; None: the target's default (on for ONNX Runtime, off for
    # TensorRT, whose parser lacks them)
    fused_attention: bool | None = None
    # Quantization preprocessing (qexport.preprocess.RestorativeLoRA, PTQ1.61's restorative
    # LoRA, is one): preprocess(module, calib_batches, progress) -> the module to quantize,
    # run before tracing; see docs/design.md
    preprocess: Callable[[Any, list[tuple], Callable[[str], None]], Any] | None = None
    # Only ops ONNX Runtime runs without the qexport library: w4a16 (the head's too) as
    # MatMulNBits; a scheme with binary weights is refused. "auto": on when the main scheme is
    # carried by ONNX Runtime's own ops (w2a16, w8a8, w6a6), so that such an export is
    # library-free throughout; the ort-std target sets it
    standard_ops: bool | str = AUTO

    def __post_init__(self):
        if self.head_scheme == AUTO:
            self.head_scheme = default_head_scheme(self.scheme)
        if self.outlier_suppression == AUTO:
            self.outlier_suppression = self.scheme.kind == "qdq"
        if self.standard_ops == AUTO:
            self.standard_ops = self.scheme.kind != "mixed"

    def is_head(self, layer_name: str) -> bool:
        """Whether a Linear is one the skip pattern keeps out of the main scheme (the default
        pattern when `skip` is None: quantize resolves it to the family's)."""
        pattern = DEFAULT_SKIP if self.skip is None else self.skip
        return bool(pattern) and re.search(pattern, layer_name) is not None

    def scheme_for(self, layer_name: str) -> Scheme | None:
        """The scheme a Linear gets (None: kept in floating point)."""
        return self.head_scheme if self.is_head(layer_name) else self.scheme

    def validate(self) -> None:
        if self.method not in METHODS:
            raise QexportError(f"unknown method {self.method!r}; choose from {', '.join(METHODS)}")
        if self.os_grid < 1:
            raise QexportError("--os-grid must be at least 1")
        if self.os_quantile is not None and not 0.0 < self.os_quantile <= 1.0:
            raise QexportError(f"--os-quantile must be within (0, 1], got {self.os_quantile}")
        learn = self.learn or LearnConfig()
        if learn.epochs < 1:
            raise QexportError("--epochs must be at least 1")
        for lr in (learn.lr_alpha, learn.lr_r1, learn.lr_r2):
            if not lr > 0:
                raise QexportError(f"--lr must be positive, got {lr}")
        if learn.mse_norm not in ("mean", "token"):
            raise QexportError(f"unknown MSE normalisation {learn.mse_norm!r}; "
                               "choose from mean, token")
        if self.e2e is not None and (self.e2e.epochs < 1 or not self.e2e.lr_scale > 0 or
                                     self.e2e.lr_bias < 0):
            raise QexportError("end-to-end tuning needs epochs >= 1 and positive learning rates")
        try:
            re.compile(self.skip or "")
        except re.error as e:
            raise QexportError(f"--skip {self.skip!r} is not a regular expression: {e}") from e
        if self.standard_ops:
            for what, s in (("--scheme", self.scheme), ("--head-scheme", self.head_scheme)):
                if s is not None and not s.standard:
                    raise QexportError(
                        f"{what} {s.label} has binary weights, which only the qexport op "
                        "library runs: use a target with it (ort), or a scheme ONNX Runtime's "
                        "own ops carry (w4a16, w2a16, w8a8, w6a6)")
                if s is not None and s.kind == "mixed" and (
                        s.salient_group_size < 16 or s.salient_group_size & (s.salient_group_size - 1)):
                    raise QexportError(f"{what} {s.label}: MatMulNBits needs a group size that "
                                       "is a power of two >= 16")

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
                "standard_ops": self.standard_ops,
                "fused_attention": self.fused_attention,
                "learn": self.learn.as_dict() if self.method == "ptq161" and self.learn else None,
                "e2e": self.e2e.as_dict() if self.method == "ptq161" and self.e2e else None,
                "preprocess": getattr(self.preprocess, "__name__", repr(self.preprocess))
                if self.preprocess else None,
                "preprocess_config": getattr(self.preprocess, "config", None) and
                self.preprocess.config.as_dict()}


@dataclasses.dataclass
class RunConfig:
    """The out/-folder job (`qexport MODEL -o OUT`, `qexport.pipeline.run`)."""
    model: str
    output: str = "out"
    _: dataclasses.KW_ONLY  # every setting after the output by name
    quantize: QuantizeConfig = dataclasses.field(default_factory=QuantizeConfig)
    target: str = "ort"  # a name in qexport.targets
    # Also write model_with_past.onnx (and what generation needs: the tokenizer,
    # genai_config.json); None: for a causal LM whose family has a KV-cache decoder, when
    # the attention is fused (pipeline._with_kv_cache)
    kv_cache: bool | None = None
    force: bool = False  # replace an output folder not written by qexport
    # Continue PTQ1.61 learning from the work folder of an interrupted run of the same inputs
    # (pipeline.work_folder); False: discard it and start over.
    resume: bool = True
    trust_pickle: bool = False
    calib: str | None = None  # calibration text (None: Brown, or random tokens)
    calib_samples: int = 64
    calib_seqlen: int = 512
    eval_text: str | None = None  # held-out text (None: Brown from char 3,000,000)
    eval_tokens: int = 4096
    eval_window: int = 512
    perplexity: bool = True
    # torch and ONNX Runtime threads (None or 0: the cores idle at the start, pipeline.idle_cores)
    threads: int | None = None

    def validate(self) -> None:
        for name in ("calib_samples", "calib_seqlen", "eval_tokens", "eval_window"):
            if getattr(self, name) < 1:
                raise QexportError(f"--{name.replace('_', '-')} must be at least 1")
        if self.threads is not None and self.threads < 0:
            raise QexportError("--threads must be at least 1 (0: the default)")
        self.quantize.validate()


def default(cls, name: str):
    """The declared default of field `name` of dataclass `cls` (factories called)."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    return f.default_factory() if f.default is dataclasses.MISSING else f.default
