"""Parity (a bug check: ORT against the PyTorch quantized reference) and quantization error
(against floating point), per layer and end to end."""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.fx

from . import ops
from .graph import layers_of

# A backend agrees with the reference when both hold (issue contract; see docs/format.md).
PARITY_MIN_COSINE = 0.999
PARITY_MIN_TOP1 = 0.99


def compare(test, ref, top1: bool = False) -> dict:
    """Agreement of `test` with `ref`: cosine, relative error, SQNR (dB), max |diff|, and with
    `top1` the agreement of the argmax along the last axis (for logits). Sums in float64,
    over rows in chunks of ~4M values: a large vocabulary's logits are not copied whole."""
    last = np.shape(ref)[-1] if np.ndim(ref) else 1
    a = torch.as_tensor(np.asarray(test)).reshape(-1, last)
    b = torch.as_tensor(np.asarray(ref)).reshape(-1, last)
    ab = aa = bb = noise = max_diff = 0.0
    agree = 0
    step = max(1, (4 << 20) // max(last, 1))
    for r in range(0, b.shape[0], step):
        x, y = a[r:r + step].double(), b[r:r + step].double()
        d = x - y
        ab += float((x * y).sum())
        aa += float(x.pow(2).sum())
        bb += float(y.pow(2).sum())
        noise += float(d.pow(2).sum())
        max_diff = max(max_diff, float(d.abs().max()) if d.numel() else 0.0)
        if top1:
            agree += int((x.argmax(-1) == y.argmax(-1)).sum())
    out = {
        "cosine": ab / max(math.sqrt(aa * bb), 1e-8),
        "rel_error": math.sqrt(noise / bb) if bb else math.inf,
        "sqnr_db": 10 * math.log10(bb / noise) if noise else math.inf,
        "max_abs_diff": max_diff,
    }
    if top1:
        out["top1_agreement"] = agree / max(b.shape[0], 1)
    return out


# sentence-transformers' pooling modes (its Pooling config's pooling_mode_<mode> flags), in
# the order it concatenates them.
POOLING_MODES = ("cls_token", "max_tokens", "mean_tokens", "mean_sqrt_len_tokens",
                 "weightedmean_tokens", "lasttoken")


def pool(hidden, modes) -> torch.Tensor:
    """Sentence embeddings [B, D × len(modes)] from token states [B, T, D], every token
    attended (the parity inputs have no padding), as sentence-transformers pools them."""
    h = torch.as_tensor(np.asarray(hidden)).double()
    t = h.shape[1]
    weights = torch.arange(1, t + 1, dtype=h.dtype).view(1, t, 1)
    fn = {"cls_token": lambda: h[:, 0], "max_tokens": lambda: h.amax(1),
          "mean_tokens": lambda: h.mean(1), "mean_sqrt_len_tokens": lambda: h.sum(1) / t ** .5,
          "weightedmean_tokens": lambda: (h * weights).sum(1) / weights.sum(),
          "lasttoken": lambda: h[:, -1]}
    return torch.cat([fn[m]() for m in modes], dim=-1)


def row_cosines(test, ref) -> list[float]:
    """The cosine of each row of `test` [B, D] with the same row of `ref`."""
    return [float(c) for c in torch.nn.functional.cosine_similarity(
        torch.as_tensor(test).double(), torch.as_tensor(ref).double(), dim=-1, eps=1e-12)]


def parity_ok(metrics: dict) -> bool:
    return (metrics["cosine"] >= PARITY_MIN_COSINE
            and metrics.get("top1_agreement", 1.0) >= PARITY_MIN_TOP1)


class _OpInputs(torch.fx.Interpreter):
    def __init__(self, gm, max_rows: int):
        super().__init__(gm)
        self.max_rows, self.inputs = max_rows, {}

    def run_node(self, n):
        if ops.spec_of_node(n) is not None:
            x = self.env[n.args[0]].detach()
            x = x.reshape(-1, x.shape[-1])
            for layer, _ in layers_of(n):  # a stacked op: each of its layers reads x
                self.inputs[layer] = x[:self.max_rows].clone()
        return super().run_node(n)


@torch.no_grad()
def op_inputs(gm: torch.fx.GraphModule, inputs: tuple, max_rows: int = 64
              ) -> dict[str, torch.Tensor]:
    """layer_name -> the activations reaching that qexport op (first `max_rows` rows)."""
    rec = _OpInputs(gm, max_rows)
    rec.run(*inputs)
    return rec.inputs


def layer_report(packed: dict,
                 fp_weights: dict[str, tuple[torch.Tensor, torch.Tensor | None]],
                 inputs: dict[str, torch.Tensor],
                 make_session: Callable | None) -> list[dict]:
    """Per quantized layer: bits/weight, quantization error vs fp, and ORT parity vs reference."""
    rows = []
    for name, w in packed.items():
        row = {"layer": name, "shape": [w.out_features, w.in_features],
               "salient": getattr(w, "num_salient", None), "bits_per_weight": w.bits_per_weight()}
        x = inputs.get(name)
        if x is not None:
            ref = ops.apply(x, w)
            wf, bf = fp_weights[name]
            fp = torch.nn.functional.linear(x.float(), wf, bf)
            row["quant_error"] = compare(ref, fp)
            if make_session is not None:
                sess = make_session(ops.single_op_model(w).SerializeToString())
                got = sess.run(None, {"X": x.float().numpy()[None]})[0][0]
                row["parity"] = compare(got, ref)
                row["parity"]["ok"] = parity_ok(row["parity"])
        rows.append(row)
    return rows


def _median_ms(fn: Callable[[], object], budget_s: float, min_runs: int = 3) -> float:
    """Median wall time of fn() in ms over at least `min_runs` runs and about `budget_s`
    seconds, after one untimed run (which may pack weights or warm caches)."""
    import statistics
    import time

    fn()
    times, end = [], time.perf_counter() + budget_s
    while len(times) < min_runs or time.perf_counter() < end:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def speed(session, fp_module: torch.nn.Module, prompt: torch.Tensor, past_session=None,
          budget_s: float = 0.3) -> dict:
    """Latency on this machine, ms: the export through ONNX Runtime (qexport ops) against the
    fp32 PyTorch model (eager, torch's thread setting), for a one-token forward and for
    `prompt` [1, T]; with a KV-cache export also one token decoded after the prompt, the
    cache updated in place. Medians over ~`budget_s` s each; a quick figure for the report,
    not a benchmark (benchmarks/bench_model.py compares against fp32 ONNX Runtime)."""
    one = prompt[:, :1]
    name = session.get_inputs()[0].name
    rows = {}
    with torch.no_grad():
        for label, ids in (("one_token", one), ("prompt", prompt)):
            rows[label] = {
                "ort_ms": _median_ms(lambda: session.run(None, {name: ids.numpy()}), budget_s),
                "torch_fp32_ms": _median_ms(lambda: fp_module(ids), budget_s)}
    out = {"threads": torch.get_num_threads(), "prompt_tokens": int(prompt.shape[1]), **rows}
    if past_session is not None and prompt.shape[1] > 1:
        t = int(prompt.shape[1])
        prefill = max(1, t - 16)
        decode_with_past(past_session, prompt[:, :2].numpy(), 1)  # untimed warm-up
        steps: list[float] = []
        decode_with_past(past_session, prompt.numpy(), prefill, step_ms=steps)
        out["decoded_token"] = {"ort_ms": float(np.median(steps)), "cached_tokens": prefill,
                                "tokens": len(steps)}
    return out


def decode_with_past(session, ids: np.ndarray, prefill: int, in_place: bool = True,
                     step_ms: list | None = None) -> np.ndarray:
    """Logits [B, T - prefill + 1, V] of positions prefill-1 .. T-1 of `ids` [B, T] through a
    KV-cache export (api.export_with_past, which returns the last token's logits): the first
    `prefill` tokens in one call with an empty cache, then one token per call, as a
    generation loop does. `in_place`: one cache buffer of T positions per past input, bound
    as both that input and its present output (IOBinding), which ONNX Runtime updates in
    place; else each call's presents are fed back as the next call's pasts (ONNX Runtime
    copies the whole cache every call). `step_ms` (in place only): gets the wall time of each
    one-token call, in ms."""
    import time

    import onnxruntime as ort

    b, t = ids.shape
    cache = [i for i in session.get_inputs() if i.name.startswith("past.")]
    steps, out, start = [prefill] + list(range(prefill + 1, t + 1)), [], 0
    if not in_place:
        past = {i.name: np.zeros((b, i.shape[1], 0, i.shape[3]), np.float32) for i in cache}
        for stop in steps:
            logits, *present = session.run(None, {
                "input_ids": ids[:, start:stop], "attention_mask": np.ones((b, stop), np.int64),
                **past})
            out.append(logits)
            past, start = dict(zip(past, present)), stop
        return np.concatenate(out, axis=1)
    binding = session.io_binding()
    binding.bind_output("logits")  # first: get_outputs() lists the outputs as bound
    for i in cache:
        buffer = ort.OrtValue.ortvalue_from_numpy(
            np.zeros((b, i.shape[1], t, i.shape[3]), np.float32))
        binding.bind_ortvalue_input(i.name, buffer)
        binding.bind_ortvalue_output("present" + i.name[len("past"):], buffer)
    for stop in steps:
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(ids[:, start:stop]))
        binding.bind_cpu_input("attention_mask", np.ones((b, stop), np.int64))
        t0 = time.perf_counter()
        session.run_with_iobinding(binding)
        if step_ms is not None and start:
            step_ms.append(1e3 * (time.perf_counter() - t0))
        out.append(binding.get_outputs()[0].numpy().copy())  # a view of a reused buffer
        start = stop
    return np.concatenate(out, axis=1)
