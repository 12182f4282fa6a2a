"""The Python contract modules and the C++ contract headers state the same constants, and the
compiled library reports the same contract version (docs/format.md).

One row of CONTRACTS per pair: the shared constants (plugins/common/qexport_contract.h and
qexport/contract.py) and each op's own (plugins/<op>/*_contract.h and
qexport/ops/<op>/contract.py). A C++ constant kFooBar is the Python FOO_BAR. A second op is one
more row (and, for its input names, one more entry in OP_INPUT_LISTS)."""
from __future__ import annotations

import importlib
import pathlib
import re
from types import ModuleType

import pytest

from native_helpers import require_library
from qexport import contract as C

ROOT = pathlib.Path(__file__).resolve().parents[1]
PLUGINS = ROOT / "plugins"

# (C++ header, Python module): every constant of one is the other's.
CONTRACTS = [
    (PLUGINS / "common" / "qexport_contract.h", "qexport.contract"),
    (PLUGINS / "binary_mixed_linear" / "bml_contract.h",
     "qexport.ops.binary_mixed_linear.contract"),
]
# Per op module: the C++ file whose kInputNames[kNumInputs] lists the input names the kernels
# use in their messages.
OP_INPUT_LISTS = {
    "qexport.ops.binary_mixed_linear.contract":
        PLUGINS / "binary_mixed_linear" / "bml_validate.cpp",
}
# Python-only constants: metadata keys written by the exporter, read by no kernel.
PYTHON_ONLY_PREFIXES = ("META_",)

_CONSTEXPR = re.compile(
    r"^\s*constexpr\s+(?:const\s+)?[\w:]+\s*\*?\s*(k\w+)\s*=\s*(.+?)\s*;", re.MULTILINE)

_IDS = [header.relative_to(ROOT).as_posix() for header, _ in CONTRACTS]


def _python_name(cpp_name: str) -> str:
    """kInSignPacked -> IN_SIGN_PACKED, kSalientQmax -> SALIENT_QMAX, kInR2 -> IN_R2."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", cpp_name[1:]).upper()


def _header_constants(header: pathlib.Path) -> dict[str, int | str]:
    text = header.read_text()
    out: dict[str, int | str] = {}
    for name, raw in _CONSTEXPR.findall(text):
        if raw.startswith('"'):
            out[name] = raw.strip('"')
        else:
            assert re.fullmatch(r"-?\d+", raw), f"{header.name}: {name} = {raw}: not a literal"
            out[name] = int(raw)
    assert out, f"no constexpr constants parsed from {header}"
    return out


def _python_constants(module: ModuleType) -> dict[str, int | str]:
    return {k: v for k, v in vars(module).items()
            if k.isupper() and isinstance(v, (int, str)) and not isinstance(v, bool)}


@pytest.mark.parametrize("header,module_name", CONTRACTS, ids=_IDS)
def test_every_header_constant_equals_python(header, module_name):
    module = importlib.import_module(module_name)
    for cpp_name, value in _header_constants(header).items():
        py_name = _python_name(cpp_name)
        assert hasattr(module, py_name), \
            f"{header.name}: {cpp_name} has no counterpart {py_name} in {module_name}"
        assert getattr(module, py_name) == value, \
            f"{cpp_name} = {value!r} but {module_name}.{py_name} = {getattr(module, py_name)!r}"


@pytest.mark.parametrize("header,module_name", CONTRACTS, ids=_IDS)
def test_every_python_constant_is_in_header(header, module_name):
    module = importlib.import_module(module_name)
    in_header = {_python_name(n) for n in _header_constants(header)}
    missing = [k for k in _python_constants(module)
               if k not in in_header and not k.startswith(PYTHON_ONLY_PREFIXES)]
    assert not missing, f"{module_name} constants missing from {header.name}: {missing}"


def test_headers_do_not_repeat_constants():
    """A constant lives in one header: the shared ones are not restated per op."""
    seen: dict[str, pathlib.Path] = {}
    for header, _ in CONTRACTS:
        for name in _header_constants(header):
            assert name not in seen, f"{name} is in both {seen[name].name} and {header.name}"
            seen[name] = header


@pytest.mark.parametrize("module_name", list(OP_INPUT_LISTS))
def test_layouts_and_input_names_agree(module_name):
    module = importlib.import_module(module_name)
    header = next(h for h, m in CONTRACTS if m == module_name)
    constants = _header_constants(header)
    layouts = {v for k, v in constants.items() if k.startswith("kLayout")}
    assert layouts == set(module.SUPPORTED_LAYOUTS)
    positions = {_python_name(k)[3:].lower(): v for k, v in constants.items()
                 if k.startswith("kIn") and not k.startswith("kInput")}
    assert len(module.INPUT_NAMES) == constants["kNumInputs"] == len(positions)
    for name, index in positions.items():
        assert module.INPUT_NAMES[index].lower() == name, (index, module.INPUT_NAMES[index], name)
    # The kernel's own list of input names (used in its error messages).
    source = OP_INPUT_LISTS[module_name]
    m = re.search(r"kInputNames\[kNumInputs\]\s*=\s*\{(.*?)\};", source.read_text(), re.S)
    assert m, f"kInputNames not found in {source}"
    assert tuple(re.findall(r'"(\w+)"', m.group(1))) == module.INPUT_NAMES
    assert all(i < module.NUM_INPUTS for i in module.OPTIONAL_INPUTS)


def test_every_op_contract_header_is_checked():
    """Each plugins/<op>/*_contract.h has a row in CONTRACTS."""
    listed = {header for header, _ in CONTRACTS}
    found = set(PLUGINS.glob("*/*_contract.h")) - {PLUGINS / "common" / "qexport_contract.h"}
    assert found, "no op contract header found"
    assert found <= listed, f"contract headers without a row in CONTRACTS: {found - listed}"


def test_name_conversion_is_systematic():
    assert _python_name("kInSignPacked") == "IN_SIGN_PACKED"
    assert _python_name("kOpName") == "OP_NAME"
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
