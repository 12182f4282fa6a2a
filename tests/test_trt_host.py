"""The TensorRT target's Python driver on a machine without TensorRT or a GPU: `tensorrt`
and the CUDA buffers are stood in for by fakes that record what they are asked, so that
build_engine, run_engine, build_and_check and `qexport build-engine` run end to end (parsing,
the optimization profile, the engine file, feeding the engine, reading its outputs, the
parity check). What the fakes cannot check (TensorRT's parser accepting the graph, the
plugins' numbers) is for tests/test_gpu_trt.py on a GPU machine."""
from __future__ import annotations

import ctypes
import pathlib
import sys
import types

import numpy as np
import pytest
import torch

from qexport.targets import trt


class _FakeTensorRT:
    """The part of the tensorrt module qexport.targets.trt uses. The engine's one output is
    `logits`, which it fills with `scale` times the reference logits of the export it was
    parsed from (scale 1: what a correct engine computes)."""

    def __init__(self):
        self.scale = 1.0
        self.folder = None  # of the model parsed last
        self.calls: list = []
        self.module = types.SimpleNamespace(
            MemoryPoolType=types.SimpleNamespace(WORKSPACE=0),
            BuilderFlag=types.SimpleNamespace(FP16="fp16"),
            TensorIOMode=types.SimpleNamespace(INPUT="in", OUTPUT="out"),
            nptype=np.dtype, **self._builder_api(), **self._runtime_api())

    def logits(self) -> np.ndarray:
        ref = np.load(self.folder / "reference.npz")["logits"]
        return np.ascontiguousarray(self.scale * ref, dtype=np.float32)

    def _builder_api(self) -> dict:
        fake = self

        class Logger:
            WARNING = 2

            def __init__(self, level):
                pass

        class Registry:
            def load_library(self, path):
                fake.calls.append(("load_library", path))
                return object()

        class Tensor:
            def __init__(self, name, shape):
                self.name, self.shape = name, shape

        class Network:
            num_inputs = 1

            def get_input(self, i):
                return Tensor("input_ids", (-1, -1))

        class Parser:
            num_errors = 0

            def __init__(self, network, logger):
                pass

            def parse(self, data, path):
                fake.calls.append(("parse", len(data), path))
                fake.folder = pathlib.Path(path).parent
                return True

        class Profile:
            def set_shape(self, name, lo, opt, hi):
                fake.calls.append(("profile", name, tuple(lo), tuple(opt), tuple(hi)))

        class BuilderConfig:
            def set_memory_pool_limit(self, pool, size):
                pass

            def set_flag(self, flag):
                fake.calls.append(("flag", flag))

            def add_optimization_profile(self, profile):
                pass

        class Builder:
            def __init__(self, logger):
                pass

            def get_plugin_registry(self):
                return Registry()

            def create_network(self, flags):
                return Network()

            def create_builder_config(self):
                return BuilderConfig()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                return b"fake engine"

        return {"Logger": Logger, "Builder": Builder, "OnnxParser": Parser,
                "_Registry": Registry}

    def _runtime_api(self) -> dict:
        fake = self

        class Context:
            def __init__(self):
                self.addresses, self.shapes = {}, {}

            def set_input_shape(self, name, shape):
                self.shapes[name] = shape

            def set_tensor_address(self, name, address):
                self.addresses[name] = address

            def get_tensor_shape(self, name):
                b, t = self.shapes["input_ids"]
                return (b, t, fake.logits().shape[-1])

            def execute_async_v3(self, stream):
                fake.calls.append(("execute", self.shapes["input_ids"]))
                logits = fake.logits()
                ctypes.memmove(self.addresses["logits"], logits.ctypes.data, logits.nbytes)
                return True

        class Engine:
            num_io_tensors = 2

            def get_tensor_name(self, i):
                return ("input_ids", "logits")[i]

            def get_tensor_mode(self, name):
                return "in" if name == "input_ids" else "out"

            def get_tensor_dtype(self, name):
                return "float32"

            def create_execution_context(self):
                return Context()

        class Runtime:
            def __init__(self, logger):
                pass

            def get_plugin_registry(self):
                return fake.module._Registry()

            def deserialize_cuda_engine(self, data):
                return Engine() if data == b"fake engine" else None

        return {"Runtime": Runtime}


@pytest.fixture
def trt_export(tmp_path):
    """A qexport folder for TensorRT (standard-op attention) of a tiny Llama."""
    from qexport import pipeline
    from qexport.config import QuantizeConfig, RunConfig
    from tiny_models import tiny_llama

    src = tmp_path / "tiny"
    tiny_llama().save_pretrained(src)
    config = RunConfig(str(src), str(tmp_path / "out"), target="ort", calib_samples=1,
                       calib_seqlen=16, perplexity=False,
                       quantize=QuantizeConfig(method="closed-form", fused_attention=False))
    return pipeline.run(config).output


def test_target_trt_end_to_end_exit_codes(tmp_path, fake_trt):
    """`qexport MODEL --target trt`: the folder, then the engine and its check (exit 0), or
    exit 3 when the engine disagrees with the reference; fused attention is refused up front
    for a runtime without ONNX Runtime's contrib ops."""
    from qexport import cli
    from tiny_models import tiny_llama

    src = tmp_path / "tiny"
    tiny_llama().save_pretrained(src)
    args = [str(src), "--target", "trt", "--method", "closed-form", "--calib-samples", "1",
            "--calib-seqlen", "16", "--no-perplexity", "--quiet"]
    assert cli.main(args + ["-o", str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / "model.engine").read_bytes() == b"fake engine"
    fake_trt.scale = -1.0
    assert cli.main(args + ["-o", str(tmp_path / "b")]) == cli.EXIT_PARITY
    assert cli.main(args + ["-o", str(tmp_path / "c"), "--fused-attention"]) == cli.EXIT_USAGE
    assert not (tmp_path / "c").exists()


@pytest.fixture
def fake_trt(monkeypatch, tmp_path):
    fake = _FakeTensorRT()
    monkeypatch.setitem(sys.modules, "tensorrt", fake.module)
    monkeypatch.setattr(trt, "_cuda_gpu_count", lambda: (1, ""))
    plugin = tmp_path / "libqexport_trt.so"
    plugin.write_bytes(b"")
    monkeypatch.setenv(trt.ENV_TRT_LIBRARY, str(plugin))
    monkeypatch.setattr(trt, "_device_buffers", lambda: (
        lambda a: torch.from_numpy(a), lambda shape, dtype: torch.empty(shape, dtype=dtype),
        0, lambda: None))
    return fake


def test_build_and_check_runs_the_engine(trt_export, fake_trt):
    assert trt.engine_prerequisites() is None
    engine = trt_export / "model.engine"
    metrics = trt.build_and_check(trt_export / "model.onnx", engine)
    assert engine.read_bytes() == b"fake engine"
    assert metrics["cosine"] > 0.999999 and metrics["top1_agreement"] == 1.0
    kinds = [c[0] for c in fake_trt.calls]
    assert kinds.count("parse") == 1 and kinds.count("execute") == 1
    profile = next(c for c in fake_trt.calls if c[0] == "profile")
    assert profile[1] == "input_ids" and profile[2] == (1, 1) and profile[4] == (64, 512)
    ids = np.load(trt_export / "reference.npz")["input_ids"]
    assert ("execute", tuple(ids.shape)) in fake_trt.calls


def test_build_engine_command_and_target_finish(trt_export, fake_trt, capsys):
    from qexport import cli

    assert cli.main(["build-engine", str(trt_export / "model.onnx")]) == 0
    assert "TensorRT vs PyTorch reference: cosine 1.0" in capsys.readouterr().err
    finish = trt.finish(trt_export, lambda msg: None)
    assert finish.status == "done" and (trt_export / "model.engine").is_file()


def test_engine_parity_failure_is_exit_3(trt_export, fake_trt):
    from qexport import cli

    fake_trt.scale = -1.0  # an engine computing something else
    assert cli.main(["build-engine", str(trt_export / "model.onnx")]) == cli.EXIT_PARITY
    assert trt.finish(trt_export, lambda msg: None).status == "parity_failed"


def test_run_engine_names_a_missing_input(trt_export, fake_trt):
    from qexport.errors import QexportError

    trt.build_engine(trt_export / "model.onnx", None, trt_export / "model.engine")
    with pytest.raises(QexportError, match="input_ids"):
        trt.run_engine(trt_export / "model.engine", None, {"ids": np.zeros((1, 2), np.int64)})
