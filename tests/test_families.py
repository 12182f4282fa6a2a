"""Model families: the registry picks the adapter by the Hugging Face model_type, wherever the
HF model sits in the module; other models get the generic adapter; the adapters' facts (blocks,
head names, context) reach the pipeline."""
from __future__ import annotations

import pytest
import torch

from qexport import families
from qexport.config import DEFAULT_SKIP
from qexport.errors import QexportError
from qexport.registry import Registry
from tiny_models import LogitsOnly, tiny_llama, tiny_opt


class _UsersWrapper(torch.nn.Module):
    """A user's own module holding a Hugging Face model under another name."""

    def __init__(self, inner):
        super().__init__()
        self.backbone = inner

    def forward(self, ids):
        return self.backbone(input_ids=ids).logits


@pytest.mark.parametrize("make,family,blocks", [
    (tiny_llama, "llama", "model.layers"), (tiny_opt, "opt", "model.decoder.layers")])
def test_detect_through_wrappers(make, family, blocks):
    model = make()
    for module, prefix in ((model, ""), (LogitsOnly(model), "model."),
                           (_UsersWrapper(model), "backbone.")):
        adapter = families.detect(module)
        assert adapter.name == family
        path, found = adapter.find_blocks(module)
        assert len(found) == 2 and path.endswith(blocks), path
        assert adapter.max_context(module) == 256


def test_unknown_models_get_the_generic_adapter():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(8, 8)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stages = torch.nn.ModuleList([Block(), Block()])

    net = Net()
    adapter = families.detect(net)
    assert adapter is families.GENERIC and adapter.max_context(net) is None
    assert adapter.find_blocks(net)[0] == "stages"
    assert adapter.kv_cache_reason(net) and adapter.skip_pattern == DEFAULT_SKIP
    with adapter.swap_attention(net) as swapped:
        assert swapped == 0
    with pytest.raises(QexportError, match="transformer blocks"):
        adapter.find_blocks(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def test_registered_families_and_their_swaps():
    names = {f.name for f in families.families()}
    assert {"llama", "opt", "gpt2"} <= names
    llama = families.detect(tiny_llama())
    assert llama.attention_swap is not None and llama.with_past is not None
    assert families.detect(tiny_opt()).kv_cache_reason(tiny_opt()) is not None


def test_registry_rows_keys_and_errors():
    reg: Registry[str] = Registry("qexport.targets", ("trt", "ort"), "thing")
    reg.add("ort", "row-ort")
    reg.add("x", "row-x")
    reg.add("trt", "row-trt")
    assert reg.keys() == ["trt", "ort", "x"]  # declared modules' order first
    assert reg.rows() == ["row-ort", "row-x", "row-trt"]
    with pytest.raises(ValueError, match="registered twice"):
        reg.add("x", "another")
    broken: Registry[str] = Registry("qexport.targets", ("no_such_module",), "thing")
    for _ in range(2):  # the import error every time, not an empty table
        with pytest.raises(ModuleNotFoundError):
            broken.keys()


def test_sequence_lengths_stay_within_the_context(tmp_path):
    """A 512-token default calibration on a model with a 64-position table (OPT indexes its
    learned positions): cut to 64, said in the report, and the export works."""
    import json

    from transformers import OPTConfig, OPTForCausalLM

    from qexport import pipeline
    from qexport.config import QuantizeConfig, RunConfig

    torch.manual_seed(0)
    src = tmp_path / "opt64"
    OPTForCausalLM(OPTConfig(vocab_size=128, hidden_size=32, ffn_dim=64, num_hidden_layers=1,
                             num_attention_heads=2, word_embed_proj_dim=32,
                             max_position_embeddings=64)).save_pretrained(src)
    result = pipeline.run(RunConfig(str(src), str(tmp_path / "out"), calib_samples=1,
                                    threads=1, quantize=QuantizeConfig(method="closed-form")))
    assert result.parity_ok
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["calibration"]["seq_len"] == 64
    assert "at most 64 tokens" in report["notes"]["context"][0]
    assert report["family"] == "opt"
