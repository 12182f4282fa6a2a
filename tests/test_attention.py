"""Attention as one GroupQueryAttention node (qexport/families/attention.py): the traced graph
agrees with the eager model, ONNX Runtime's node with both, across batch and sequence lengths,
head groupings and families (rotary or learned positions, soft-capping, sliding windows, q/k
norms); other attention classes and --no-fused-attention are left alone."""
import collections

import numpy as np
import onnx
import pytest
import torch

from qexport import native
from qexport import families
from qexport.families.attention import fused_attention, why_not_fused
from qexport.onnx_export import export_onnx, trace
from tiny_models import LogitsOnly, tiny_causal_lm, tiny_llama


def _llama(kv_heads, family="llama", rope_scaling=None, window=None):
    import transformers
    torch.manual_seed(0)
    prefix = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}[family]
    cfg = getattr(transformers, prefix + "Config")(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=256,
        rope_theta=500.0, sliding_window=window, rope_scaling=rope_scaling)
    return LogitsOnly(getattr(transformers, prefix + "ForCausalLM")(cfg).eval())


def _ops(path):
    return collections.Counter(n.op_type for n in onnx.load(path).graph.node)


_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


@pytest.mark.parametrize("family,kv_heads,rope,window", [
    ("llama", 1, None, None), ("llama", 2, None, None), ("llama", 4, None, None),
    ("mistral", 2, None, None), ("mistral", 2, None, 5), ("qwen2", 2, None, None),
    ("llama", 2, {"rope_type": "linear", "factor": 2.0}, None),
    ("llama", 2, _LLAMA3_ROPE, None)],
    ids=lambda v: v["rope_type"] if isinstance(v, dict) else None)
def test_fused_attention_matches_eager(tmp_path, family, kv_heads, rope, window):
    """Rotary scaling (linear, Llama 3) holds: the angles come from the model's own module.
    A sliding window (Mistral's, 5 tokens here) is ONNX Runtime's local_window_size."""
    model = _llama(kv_heads, family, rope, window)
    example = (torch.randint(0, 128, (2, 8)),)
    gm = trace(model, example, swap=fused_attention)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.qexport.group_query_attention.default) == 2
    path = tmp_path / "model.onnx"
    export_onnx(gm, example, path, {})
    ops = _ops(path)
    assert ops["GroupQueryAttention"] == 2 and "Softmax" not in ops
    session = native.make_session(path)
    for shape in [(1, 1), (3, 11), (2, 130)]:  # one token, odd lengths, past the 128 mark
        ids = torch.randint(0, 128, shape, generator=torch.Generator().manual_seed(shape[1]))
        with torch.no_grad():
            eager, traced = model(ids), gm(ids)
        got = session.run(None, {session.get_inputs()[0].name: ids.numpy()})[0]
        assert torch.allclose(traced, eager, atol=1e-5), shape
        assert np.abs(got - eager.numpy()).max() < 1e-4, shape


# Families beside Llama (tests/tiny_models.py): Gemma 1 (head 256, one kv head), Gemma 2
# (soft-capping, a sliding layer and a full one), Gemma 3 (q/k norms, two rotary bases), OPT
# and GPT-2 (learned positions: no rotary; GPT-2 with one qkv projection), Phi-3, Qwen3.
OTHER_FAMILIES = ("gemma", "gemma2", "gemma3_text", "opt", "gpt2", "phi3", "qwen3")


def _family_model(model_type):
    hf = tiny_causal_lm(model_type)
    family = families.detect(hf)
    if family.normalize:  # GPT-2's Conv1D as nn.Linear, as the loader does
        family.normalize(hf)
    return LogitsOnly(hf)


@pytest.mark.parametrize("model_type", OTHER_FAMILIES)
def test_fused_attention_of_other_families(tmp_path, model_type):
    """Every attention block fused; the traced graph equals the eager model and ONNX Runtime's
    nodes agree with both, past the sliding windows (16) and within the position tables."""
    model = _family_model(model_type)
    example = (torch.randint(0, 128, (2, 8)),)
    gm = trace(model, example, swap=fused_attention)
    path = tmp_path / "model.onnx"
    export_onnx(gm, example, path, {})
    ops = _ops(path)
    assert ops["GroupQueryAttention"] == 2 and "Softmax" not in ops
    session = native.make_session(path)
    for shape in [(1, 1), (3, 11), (2, 40)]:
        ids = torch.randint(0, 128, shape, generator=torch.Generator().manual_seed(shape[1]))
        with torch.no_grad():
            eager, traced = model(ids), gm(ids)
        got = session.run(None, {session.get_inputs()[0].name: ids.numpy()})[0]
        assert torch.allclose(traced, eager, atol=1e-5), shape
        assert np.abs(got - eager.numpy()).max() < 1e-4, shape


def test_unfused_and_unsupported_are_left_alone(tmp_path):
    example = (torch.randint(0, 128, (2, 8)),)
    path = tmp_path / "plain.onnx"
    export_onnx(trace(LogitsOnly(tiny_llama()), example), example, path, {})
    assert "GroupQueryAttention" not in _ops(path)
    gpt2 = LogitsOnly(tiny_causal_lm("gpt2"))  # as built: Conv1D, not nn.Linear, projections
    with fused_attention(gpt2) as swapped:
        assert swapped == 0
    assert "not nn.Linear" in why_not_fused(gpt2)
    import transformers
    narrow = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
        num_attention_heads=8, num_key_value_heads=2))  # head dim 8: ORT's rotary wants 16k
    with fused_attention(narrow) as swapped:
        assert swapped == 0


def test_forward_restored_after_tracing():
    model = _llama(2)
    attn = model.model.model.layers[0].self_attn
    hook = attn.forward  # an instance-level forward (as wrappers install) survives the swap
    attn.forward = hook
    with fused_attention(model) as swapped:
        assert swapped == 2 and attn.forward is not hook
    assert attn.forward is hook and not hasattr(attn, "_qexport_shared")
    other = model.model.model.layers[1].self_attn
    assert "forward" not in vars(other)  # the class's own forward again


@pytest.mark.parametrize("family,window", [("llama", None), ("qwen2", None), ("mistral", 4),
                                           *((f, None) for f in OTHER_FAMILIES)])
def test_with_past_decodes_like_the_full_forward(tmp_path, family, window):
    """The KV-cache graph (families.attention.WithPast) through ONNX Runtime: a prompt with an
    empty cache, then tokens one at a time, give the full forward's logits at the prompt's
    last token and at each decoded one, whether the presents are fed back as the next pasts or
    the cache is a buffer of the full length updated in place; for one row and for two."""
    from qexport.api import export_with_past
    from qexport.check import decode_with_past

    model = _family_model(family) if family in OTHER_FAMILIES else _llama(2, family,
                                                                          window=window)
    n = model.model.config.num_hidden_layers
    export_with_past(model, None, tmp_path / "past.onnx")  # floating point: no quantization
    session = native.make_session(tmp_path / "past.onnx")
    inputs = session.get_inputs()
    assert [i.name for i in inputs[:2]] == ["input_ids", "attention_mask"]
    attn = model.model.base_model.layers[0].self_attn if family not in ("opt", "gpt2") else None
    if attn is not None:  # [kv heads, head size] of the model
        cache = [attn.config.num_key_value_heads, attn.head_dim]
        assert [i.shape[1:2] + i.shape[3:] for i in inputs[2:]] == [cache] * 2 * n
    # torch.export's symbols renamed (onnx_export._name_dims), expressions included
    assert [i.shape for i in inputs[:2]] == [["batch", "sequence"], ["batch", "total_sequence"]]
    assert inputs[2].shape[:3:2] == ["batch", "past_sequence"]
    assert session.get_outputs()[1].shape[2] == "Max(total_sequence, past_sequence)"
    for rows, prefill, seed in ((1, 13, 1), (2, 6, 2)):
        ids = torch.randint(0, 128, (rows, 20), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            full = model(ids).numpy()[:, prefill - 1:]
        for in_place in (False, True):  # the last token's logits of each call
            got = decode_with_past(session, ids.numpy(), prefill, in_place=in_place)
            assert got.shape == full.shape, (rows, in_place)
            assert np.abs(got - full).max() < 1e-4, (rows, in_place)


@pytest.mark.parametrize("family,in_place", [("llama", False), ("llama", True),
                                             ("gpt2", True), ("opt", False)])
def test_with_past_rows_of_different_lengths(tmp_path, family, in_place):
    """A batch whose rows differ in length: the prompts padded on the right (mask 0s), then a
    token per row per call, each row at its own position (rotary angles, or the row of a
    learned position table: GPT-2, OPT). Each row's logits are those of its own unpadded
    forward: the prompt's last real token's, then each decoded one's."""
    import onnxruntime as ort

    from qexport.api import export_with_past

    model = _llama(2) if family == "llama" else _family_model(family)
    export_with_past(model, None, tmp_path / "past.onnx")
    session = native.make_session(tmp_path / "past.onnx")
    cache = [i for i in session.get_inputs() if i.name.startswith("past.")]
    kv, d = cache[0].shape[1], cache[0].shape[3]
    lengths, steps = [5, 9], 3
    g = torch.Generator().manual_seed(3)
    rows = [torch.randint(0, 128, (1, n + steps), generator=g) for n in lengths]
    with torch.no_grad():
        full = [model(r).numpy()[0] for r in rows]  # each row alone, unpadded
    width = max(lengths)
    ids = np.zeros((2, width), np.int64)
    for b, (r, n) in enumerate(zip(rows, lengths)):
        ids[b, :n] = r[0, :n].numpy()
    if in_place:
        binding = session.io_binding()
        binding.bind_output("logits")
        for i in cache:
            buf = ort.OrtValue.ortvalue_from_numpy(np.zeros((2, kv, width + steps, d), np.float32))
            binding.bind_ortvalue_input(i.name, buf)
            binding.bind_ortvalue_output("present" + i.name[len("past"):], buf)
    else:
        past = {i.name: np.zeros((2, kv, 0, d), np.float32) for i in cache}
    for k in range(steps + 1):
        mask = np.zeros((2, width + k), np.int64)
        for b, n in enumerate(lengths):
            mask[b, :n + k] = 1
        step_ids = ids if k == 0 else np.array(
            [[rows[b][0, n + k - 1].item()] for b, n in enumerate(lengths)], np.int64)
        if in_place:
            binding.bind_cpu_input("input_ids", step_ids)
            binding.bind_cpu_input("attention_mask", mask)
            session.run_with_iobinding(binding)
            logits = binding.get_outputs()[0].numpy().copy()
        else:
            logits, *present = session.run(
                None, {"input_ids": step_ids, "attention_mask": mask, **past})
            past = dict(zip(past, present))
        for b, n in enumerate(lengths):  # position n + k - 1 of row b
            assert np.abs(logits[b, 0] - full[b][n + k - 1]).max() < 1e-4, (k, b)


def test_reference_op_reads_a_longer_cache_buffer_per_row():
    """The PyTorch body of qexport::group_query_attention (the reference the traced graph
    runs): a cache buffer longer than the tokens it holds gives the same attention as one of
    the exact length, each row at its own length (seqlens_k), and the present is the buffer
    with each row's new keys/values written at its length; the rest is the buffer's own."""
    gqa = torch.ops.qexport.group_query_attention
    g = torch.Generator().manual_seed(0)
    heads, kv, d, s = 4, 2, 16, 1
    cos, sin = torch.rand(64, d // 2, generator=g), torch.rand(64, d // 2, generator=g)
    lengths = [5, 9]  # cached tokens of rows 0 and 1

    def rand(*shape):
        return torch.randn(*shape, generator=g)
    q, k, v = rand(2, s, heads * d), rand(2, s, kv * d), rand(2, s, kv * d)
    buf_k, buf_v = rand(2, kv, 32, d), rand(2, kv, 32, d)  # 32 >= every length: in place
    seqlens = torch.tensor([n + s - 1 for n in lengths], dtype=torch.int32)
    total = max(lengths) + s
    out, pk, pv = gqa(q, k, v, buf_k, buf_v, seqlens, torch.tensor(total, dtype=torch.int32),
                      cos, sin, heads, kv, 0.25, total)
    assert pk.shape == buf_k.shape
    for i, n in enumerate(lengths):  # row i alone, with a cache of exactly its length
        one = gqa(q[i:i + 1], k[i:i + 1], v[i:i + 1], buf_k[i:i + 1, :, :n],
                  buf_v[i:i + 1, :, :n], seqlens[i:i + 1], torch.tensor(n + s, dtype=torch.int32),
                  cos, sin, heads, kv, 0.25, n + s)
        assert torch.allclose(out[i], one[0][0], atol=1e-6), i
        assert torch.equal(pk[i, :, :n + s], one[1][0]) and torch.equal(pv[i, :, :n + s], one[2][0])
        assert torch.equal(pk[i, :, n + s:], buf_k[i, :, n + s:])  # untouched past the row


def test_shared_external_data(tmp_path):
    """A second model's tensors whose bytes are in the first model's data file point there;
    the rest go to its own file; both load with the right values."""
    from onnx import helper, numpy_helper

    from qexport.onnx_export import save_external_aligned

    rng = np.random.default_rng(0)
    a, b, c = (rng.standard_normal((64, 64)).astype(np.float32) for _ in range(3))

    def model(tensors):
        inits = [numpy_helper.from_array(t, f"w{i}") for i, t in enumerate(tensors)]
        nodes = [helper.make_node("Add", ["x", f"w{i}"], [f"y{i}"]) for i in range(len(tensors))]
        outs = [helper.make_tensor_value_info(f"y{i}", onnx.TensorProto.FLOAT, [64, 64])
                for i in range(len(tensors))]
        g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(
            "x", onnx.TensorProto.FLOAT, [64, 64])], outs, initializer=inits)
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)

    first = save_external_aligned(model([a, b]), tmp_path / "a.onnx", min_bytes=64)
    assert save_external_aligned(model([b, a]), tmp_path / "b.onnx", min_bytes=64,
                                 share_data_with=tmp_path / "a.onnx") is None  # all shared
    own = save_external_aligned(model([c, b]), tmp_path / "c.onnx", min_bytes=64,
                                share_data_with=tmp_path / "a.onnx")
    assert own.stat().st_size < first.stat().st_size  # only c written again
    for name, want in (("b.onnx", [b, a]), ("c.onnx", [c, b])):
        loaded = onnx.load(tmp_path / name)
        for init, w in zip(loaded.graph.initializer, want):
            assert np.array_equal(numpy_helper.to_array(init), w)
