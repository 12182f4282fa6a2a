"""Sentence-embedding pooling: the modes as sentence-transformers computes them, and the
pooling config read from a sentence-transformers folder."""
from __future__ import annotations

import json
import math

import pytest
import torch

from qexport.check import POOLING_MODES, pool, row_cosines
from qexport.errors import QexportError
from qexport.models import sentence_pooling

H = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]])  # [1 row, 3 tokens, 2 dims]
EXPECTED = {"cls_token": [1, 2], "max_tokens": [5, 6], "mean_tokens": [3, 4],
            "mean_sqrt_len_tokens": [9 / math.sqrt(3), 12 / math.sqrt(3)],
            "weightedmean_tokens": [22 / 6, 28 / 6], "lasttoken": [5, 6]}


@pytest.mark.parametrize("mode", POOLING_MODES)
def test_pool_modes(mode):
    assert pool(H, (mode,))[0].tolist() == pytest.approx(EXPECTED[mode])


def test_pool_concatenates_in_order_and_cosines_per_row():
    got = pool(H.numpy(), ("cls_token", "mean_tokens"))
    assert got.shape == (1, 4) and got[0].tolist() == pytest.approx([1, 2, 3, 4])
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    assert row_cosines(a, torch.tensor([[2.0, 0.0], [-1.0, -1.0]])) == pytest.approx([1, -1])


def _folder(tmp_path, modules, flags, path="1_Pooling"):
    if modules is not None:
        (tmp_path / "modules.json").write_text(json.dumps(modules))
    if flags is not None:
        (tmp_path / path).mkdir()
        (tmp_path / path / "config.json").write_text(json.dumps(flags))
    return tmp_path


def test_sentence_pooling_config(tmp_path):
    (tmp_path / "a").mkdir()
    assert sentence_pooling(tmp_path / "a") is None  # not a sentence-transformers folder
    modules = [{"path": "", "type": "sentence_transformers.models.Transformer"},
               {"path": "2_Pool", "type": "sentence_transformers.models.Pooling"}]
    (tmp_path / "b").mkdir()
    folder = _folder(tmp_path / "b", modules, {"pooling_mode_mean_tokens": True,
                                               "pooling_mode_cls_token": True,
                                               "pooling_mode_max_tokens": False}, "2_Pool")
    assert sentence_pooling(folder) == ("cls_token", "mean_tokens")  # modules.json's path
    (tmp_path / "c").mkdir()
    folder = _folder(tmp_path / "c", None, {"pooling_mode_mystery": True})
    with pytest.raises(QexportError, match="unsupported pooling mystery"):
        sentence_pooling(folder)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "modules.json").write_text("{not json")
    with pytest.raises(QexportError, match="cannot read the sentence-transformers pooling"):
        sentence_pooling(tmp_path / "d")
