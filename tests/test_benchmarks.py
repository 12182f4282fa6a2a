"""The benchmark scripts' own logic, without running what they measure: which GGUF tensors
count as block Linears, and how llama-bench's JSON becomes tokens/s per thread count."""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_llama_cpp  # noqa: E402


@pytest.mark.parametrize("name,block", [
    ("blk.0.attn_q.weight", True), ("blk.12.attn_k.weight", True), ("blk.3.attn_v.weight", True),
    ("blk.29.attn_output.weight", True), ("blk.0.ffn_gate.weight", True),
    ("blk.0.ffn_up.weight", True), ("blk.7.ffn_down.weight", True),
    ("blk.0.attn_norm.weight", False), ("blk.0.ffn_norm.weight", False),
    ("token_embd.weight", False), ("output.weight", False), ("output_norm.weight", False),
    ("blk.0.attn_q.bias", False),
])
def test_block_linear_tensors(name, block):
    assert bool(bench_llama_cpp.BLOCK_LINEAR.search(name)) == block


def test_llama_bench_json_to_tokens_per_second(monkeypatch, tmp_path):
    calls = []

    def fake_run(cmd, log=None, **kw):
        calls.append(cmd)
        assert kw.get("preexec_fn") is bench_llama_cpp._unpinned  # all CPUs, not the pinned one
        prompt = cmd[cmd.index("-p") + 1] != "0"
        rows = [{"n_threads": t, "n_prompt": 128 if prompt else 0, "n_gen": 0 if prompt else 64,
                 "avg_ts": (400.0 if prompt else 100.0) * t} for t in (1, 2)]
        return subprocess.CompletedProcess(cmd, 0, json.dumps(rows), "")

    monkeypatch.setattr(bench_llama_cpp, "_run", fake_run)
    monkeypatch.setattr(bench_llama_cpp, "build", lambda version=None, isa="native": tmp_path)
    got = bench_llama_cpp.bench(tmp_path / "m.gguf", [1, 2], prompt=128, gen=64, depth=128)
    assert got == {("prompt", 1): 400.0, ("prompt", 2): 800.0,
                   ("decode", 1): 100.0, ("decode", 2): 200.0}
    prompt_cmd, decode_cmd = calls
    assert prompt_cmd[prompt_cmd.index("-d") + 1] == "0"  # the prompt into an empty cache
    assert decode_cmd[decode_cmd.index("-d") + 1] == "128"  # decoding after 128 cached
    assert decode_cmd[decode_cmd.index("-n") + 1] == "64"
    assert prompt_cmd[prompt_cmd.index("-t") + 1] == "1,2"


def test_a_failed_step_is_one_line(tmp_path):
    with pytest.raises(SystemExit) as e:
        bench_llama_cpp._run([sys.executable, "-c", "import sys; print('noise', file=sys.stderr); sys.exit('boom')"])
    assert "failed" in str(e.value) and "boom" in str(e.value) and "\n" not in str(e.value)
