"""Generation and serving from an export folder: `qexport generate`/`chat`, onnxruntime-genai
loading the folder, and the Triton model repository (issue: generation and serving)."""
import importlib.util
import json
import pathlib
import shutil

import numpy as np
import pytest
from test_cli import assert_one_line_error, run_cli

PROMPT = [5, 17, 33, 72, 101, 9]
EOS = 10  # "\n" in the tiny tokenizer
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}a:{% endif %}")


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A tiny Llama with a tokenizer, a chat template and an end-of-sequence token, exported
    with the CLI's defaults (but a short calibration)."""
    from tiny_models import save_with_tokenizer, tiny_llama
    from transformers import AutoTokenizer

    base = tmp_path_factory.mktemp("generate")
    model = tiny_llama()
    model.generation_config.eos_token_id = EOS
    src = save_with_tokenizer(model, base / "tiny")
    tok = AutoTokenizer.from_pretrained(src)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(src)
    out = base / "out"
    proc = run_cli(src, "-o", out, "--calib-samples", "2", "--calib-seqlen", "32", "--preset",
                   "fast", "--no-perplexity", "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    return out


def test_default_run_writes_what_generation_needs(export):
    report = json.loads((export / "report.json").read_text())
    for name in ("model_with_past.onnx", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", "genai_config.json"):
        assert (export / name).is_file(), name
        assert name in report["files"], name
    assert report["timings"]["export_with_past"] > 0
    assert report["end_to_end"]["kv_cache"]["parity"]["top1_agreement"] == 1.0
    genai = json.loads((export / "genai_config.json").read_text())
    decoder = genai["model"]["decoder"]
    assert decoder["session_options"]["custom_ops_library"] == "libqexport_ops.so"
    assert (export / decoder["filename"]).is_file()
    assert (decoder["num_hidden_layers"], decoder["num_key_value_heads"],
            decoder["head_size"]) == (2, 2, 16)
    assert genai["model"]["eos_token_id"] == EOS
    assert genai["model"]["context_length"] == 256


def test_greedy_tokens_are_the_full_models_argmax(export):
    """Each greedy token through the in-place cache is the argmax of model.onnx (no cache) over
    the prompt and the tokens before it."""
    from qexport import native
    from qexport.generate import Generator

    new = list(Generator(export, threads=1).generate(PROMPT, 12))
    assert len(new) == 12  # (or stopped at EOS, which this prompt does not reach)
    session = native.make_session(export / "model.onnx", threads=1)
    ids = np.asarray([PROMPT + new], np.int64)
    logits = session.run(None, {"input_ids": ids})[0][0]
    expected = logits[len(PROMPT) - 1:-1].argmax(-1)
    np.testing.assert_array_equal(new, expected)


def test_sampling_follows_its_settings(export):
    from qexport.generate import Generator, Sampling

    gen = Generator(export, threads=1)
    greedy = list(gen.generate(PROMPT, 10))
    assert gen.stats.new_tokens == 10 and gen.stats.stopped == "max_new_tokens"
    assert gen.stats.first_token_s > 0 and gen.stats.tokens_per_s > 0
    hot = Sampling(temperature=5.0, seed=3)
    first = list(gen.generate(PROMPT, 10, hot))
    assert first == list(gen.generate(PROMPT, 10, hot))  # the seed fixes the draw
    assert first != list(gen.generate(PROMPT, 10, Sampling(temperature=5.0, seed=4)))
    assert list(gen.generate(PROMPT, 10, Sampling(temperature=5.0, top_k=1, seed=3))) == greedy
    # top-p: only the smallest set of tokens reaching p is ever drawn
    rng = np.random.default_rng(0)
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    drawn = {Sampling(temperature=1.0, top_p=0.7).pick(logits, rng) for _ in range(200)}
    assert drawn == {0, 1}
    drawn = {Sampling(temperature=1.0, top_k=3).pick(logits, rng) for _ in range(400)}
    assert drawn == {0, 1, 2}


def test_generation_stops_at_eos_and_at_the_context(export):
    from qexport.generate import Generator

    gen = Generator(export, threads=1)
    greedy = list(gen.generate(PROMPT, 12))
    stop_at = greedy[3]
    got = list(gen.generate(PROMPT, 12, stop=[stop_at]))
    assert got == greedy[:greedy.index(stop_at) + 1] and gen.stats.stopped == "eos"
    gen.context = len(PROMPT) + 4
    assert len(list(gen.generate(PROMPT, 12))) == 4 and gen.stats.stopped == "context"


def test_generate_cli_streams_text_and_reports_speed(export):
    proc = run_cli("generate", export, "--prompt", "Hello wor", "--max-new-tokens", "8",
                   "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Hello wor") and len(proc.stdout.strip()) > len("Hello wor")
    assert "time to first token" in proc.stderr and "tokens/s" in proc.stderr
    proc = run_cli("generate", export, "--prompt-ids", ",".join(map(str, PROMPT)),
                   "--max-new-tokens", "5", "--temperature", "0")
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.split()) == 5 and all(t.isdigit() for t in proc.stdout.split())


def test_chat_uses_the_template_and_keeps_the_conversation(export):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "qexport.cli", "chat", str(export),
                           "--max-new-tokens", "6", "--system", "be brief"],
                          input="hi\nwhat?\n/exit\n", capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("time to first token") == 2
    # the second turn's prompt holds the first turn (system, user, assistant, user)
    prompts = [int(line.split(" for ")[1].split()[0]) for line in proc.stderr.splitlines()
               if "time to first token" in line]
    assert prompts[1] > prompts[0] + len("u:what?\n")


def test_generate_errors_are_one_line(export, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(export, bare)
    (bare / "model_with_past.onnx").unlink()
    assert_one_line_error(run_cli("generate", bare, "--prompt", "x"),
                          "has no model_with_past.onnx", "qexport MODEL")
    assert_one_line_error(run_cli("generate", export, "--prompt", "x", "--top-p", "0"),
                          "--top-p")
    assert_one_line_error(run_cli("generate", export, "--prompt-ids", "1 999"),
                          "within [0, 128)")
    assert_one_line_error(run_cli("generate", export, "--prompt-ids", "1 x"), "--prompt-ids")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (bare / name).unlink()
    shutil.copy(export / "model_with_past.onnx", bare)
    assert_one_line_error(run_cli("generate", bare, "--prompt", "x"), "--prompt-ids")
    assert_one_line_error(run_cli("generate", tmp_path / "nowhere", "--prompt", "x"),
                          "no such folder")


def test_onnxruntime_genai_generates_the_same_greedy_tokens(export):
    """onnxruntime-genai loads the folder (genai_config.json, the op library through
    custom_ops_library, the shared past/present buffer) and its greedy tokens are ours. (Its
    own tokenizer cannot read the tiny WordLevel tokenizer.json, so ids go in and out.)"""
    if importlib.util.find_spec("onnxruntime_genai") is None:
        pytest.skip("onnxruntime-genai is not installed (the test extra installs it)")
    import onnxruntime_genai as og

    from qexport.generate import Generator

    model = og.Model(str(export))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(PROMPT) + 24, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.asarray([PROMPT], np.int32))
    theirs = []
    while not generator.is_done():
        generator.generate_next_token()
        theirs.append(int(generator.get_next_tokens()[0]))
    ours = list(Generator(export, threads=1).generate(PROMPT, 24, stop=[EOS]))
    assert theirs == ours and len(ours) >= 8


def _model_config_pb2():
    """Triton's model-config protobuf module, loaded from tritonclient by path (its package
    __init__ imports grpc, which the schema does not need)."""
    spec = importlib.util.find_spec("tritonclient")
    if spec is None:
        pytest.skip("tritonclient is not installed (scripts/install.sh installs it)")
    path = pathlib.Path(spec.submodule_search_locations[0]) / "grpc" / "model_config_pb2.py"
    module_spec = importlib.util.spec_from_file_location("triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def test_triton_repository_validates_against_the_schema(export, tmp_path):
    from google.protobuf import text_format

    from qexport.serving import TRITON_MOUNT

    pb2 = _model_config_pb2()
    fake_engine = tmp_path / "with-engine"
    shutil.copytree(export, fake_engine)
    (fake_engine / "model.engine").write_bytes(b"engine bytes")  # the layout, not the engine
    (fake_engine / "libqexport_trt.so").write_bytes(b"plugin bytes")
    repo = tmp_path / "repo"
    proc = run_cli("triton", fake_engine, "-o", repo)
    assert proc.returncode == 0, proc.stderr
    configs = sorted(repo.glob("*/config.pbtxt"))
    assert [c.parent.name for c in configs] == ["qexport", "qexport_decoder", "qexport_trt"]
    for path in configs:
        config = text_format.Parse(path.read_text(), pb2.ModelConfig())  # strict: unknown fields fail
        assert config.name == path.parent.name
        version = path.parent / "1"
        assert (version / config.default_model_filename).is_file()
        for lib in config.model_operations.op_library_filename:
            assert lib.startswith(TRITON_MOUNT + "/")
            assert (repo / lib[len(TRITON_MOUNT) + 1:]).is_file(), lib
        names = {t.name for t in config.input}
        if config.backend == "onnxruntime":
            assert len(config.model_operations.op_library_filename) == 1
        assert "input_ids" in names
    decoder = text_format.Parse((repo / "qexport_decoder/config.pbtxt").read_text(),
                                pb2.ModelConfig())
    assert {"attention_mask", "past.0.key", "past.1.value"} <= {t.name for t in decoder.input}
    assert (repo / "qexport_trt/1/libqexport_trt.so").is_file()
    assert_one_line_error(run_cli("triton", fake_engine, "-o", repo), "not empty")
