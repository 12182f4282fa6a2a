"""qexport.native: finding and loading libqexport_ops.so."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from native_helpers import require_library


def test_import_loads_nothing():
    code = ("import sys, qexport, qexport.native\n"
            "assert 'onnxruntime' not in sys.modules, 'onnxruntime imported'\n"
            "maps = open('/proc/self/maps').read()\n"
            "assert 'libqexport_ops' not in maps, 'op library loaded at import'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_env_override_missing_file(monkeypatch, tmp_path):
    from qexport import native
    from qexport.errors import QexportError

    monkeypatch.setenv(native.ENV_LIBRARY, str(tmp_path / "nope.so"))
    with pytest.raises(QexportError) as info:
        native.library_path()
    assert "\n" not in str(info.value) and "QEXPORT_OPS_LIBRARY" in str(info.value)


def test_env_override_wins(monkeypatch, tmp_path):
    from qexport import native

    lib = require_library()
    copy = tmp_path / "libcopy.so"
    copy.write_bytes(lib.read_bytes())
    monkeypatch.setenv(native.ENV_LIBRARY, str(copy))
    assert native.library_path() == copy.resolve()


def test_not_a_library_is_a_clear_error(monkeypatch, tmp_path):
    from qexport import native
    from qexport.errors import QexportError

    bogus = tmp_path / "libqexport_ops.so"
    bogus.write_text("not an ELF file")
    with pytest.raises(QexportError, match="cannot load"):
        native.check_contract(bogus)


def test_session_options_register_the_ops():
    from qexport import native

    lib = require_library()
    options = native.session_options(lib)
    assert options is not None
    if os.environ.get(native.ENV_LIBRARY) is None:
        assert lib.name == native.LIBRARY_NAME
