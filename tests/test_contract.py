"""qexport/contract.py and plugins/common/qexport_contract.h state the same constants, and
the compiled library reports the same contract version (docs/format.md)."""
from __future__ import annotations

import pathlib
import re

import pytest

from native_helpers import require_library
from qexport import contract as C

ROOT = pathlib.Path(__file__).resolve().parents[1]
HEADER = ROOT / "plugins" / "common" / "qexport_contract.h"
VALIDATE_CPP = ROOT / "plugins" / "binary_mixed_linear" / "bml_validate.cpp"
# Python-only constants: metadata keys written by the exporter, read by no kernel.
PYTHON_ONLY_PREFIXES = ("META_",)

_CONSTEXPR = re.compile(
    r"^\s*constexpr\s+(?:const\s+)?[\w:]+\s*\*?\s*(k\w+)\s*=\s*(.+?)\s*;", re.MULTILINE)


def _python_name(cpp_name: str) -> str:
    """kInSignPacked -> IN_SIGN_PACKED, kSalientQmax -> SALIENT_QMAX, kInR2 -> IN_R2."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", cpp_name[1:]).upper()


def _header_constants() -> dict[str, int | str]:
    text = HEADER.read_text()
    out: dict[str, int | str] = {}
    for name, raw in _CONSTEXPR.findall(text):
        if raw.startswith('"'):
            out[name] = raw.strip('"')
        else:
            assert re.fullmatch(r"-?\d+", raw), f"{HEADER.name}: {name} = {raw}: not a literal"
            out[name] = int(raw)
    assert out, f"no constexpr constants parsed from {HEADER}"
    return out


def _python_constants() -> dict[str, int | str]:
    return {k: v for k, v in vars(C).items()
            if k.isupper() and isinstance(v, (int, str)) and not isinstance(v, bool)}


def test_every_header_constant_equals_python():
    for cpp_name, value in _header_constants().items():
        py_name = _python_name(cpp_name)
        assert hasattr(C, py_name), f"{cpp_name} has no counterpart {py_name} in contract.py"
        assert getattr(C, py_name) == value, \
            f"{cpp_name} = {value!r} but contract.{py_name} = {getattr(C, py_name)!r}"


def test_every_python_constant_is_in_header():
    header = {_python_name(n) for n in _header_constants()}
    missing = [k for k in _python_constants()
               if k not in header and not k.startswith(PYTHON_ONLY_PREFIXES)]
    assert not missing, f"contract.py constants missing from {HEADER.name}: {missing}"


def test_layouts_and_input_names_agree():
    header = _header_constants()
    layouts = {v for k, v in header.items() if k.startswith("kLayout")}
    assert layouts == set(C.SUPPORTED_LAYOUTS)
    positions = {_python_name(k)[3:].lower(): v for k, v in header.items()
                 if k.startswith("kIn") and not k.startswith("kInput")}
    assert len(C.INPUT_NAMES) == header["kNumInputs"] == len(positions)
    for name, index in positions.items():
        assert C.INPUT_NAMES[index].lower() == name, (index, C.INPUT_NAMES[index], name)
    # The kernel's own list of input names (used in its error messages).
    m = re.search(r"kInputNames\[kNumInputs\]\s*=\s*\{(.*?)\};", VALIDATE_CPP.read_text(), re.S)
    assert m, f"kInputNames not found in {VALIDATE_CPP}"
    assert tuple(re.findall(r'"(\w+)"', m.group(1))) == C.INPUT_NAMES
    assert all(i < C.NUM_INPUTS for i in C.OPTIONAL_INPUTS)


def test_name_conversion_is_systematic():
    assert _python_name("kInSignPacked") == "IN_SIGN_PACKED"
    assert _python_name("kOpBinaryMixedLinear") == "OP_BINARY_MIXED_LINEAR"
    assert _python_name("kInR2") == "IN_R2"
    assert _python_name("kDomain") == "DOMAIN"


def test_library_reports_contract_version():
    from qexport import native

    lib = require_library()
    assert native.library_version(lib) == C.CONTRACT_VERSION
    assert native.check_contract(lib) == lib


def test_library_version_mismatch_is_a_clear_error(monkeypatch):
    from qexport import native
    from qexport.errors import QexportError

    lib = require_library()
    monkeypatch.setattr(C, "CONTRACT_VERSION", C.CONTRACT_VERSION + 100)
    with pytest.raises(QexportError, match="contract version 1 but this qexport package expects"):
        native.check_contract(lib)
