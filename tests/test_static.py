"""Static analysis is part of the tests: pyflakes rules (ruff) over every Python folder, so
code that no test runs here (TensorRT, CUDA drivers) still gets its names checked."""
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
FOLDERS = ["qexport", "passes", "tests", "benchmarks", "samples", "scripts"]


def _ruff() -> list[str]:
    exe = shutil.which("ruff")
    if exe:
        return [exe]
    try:
        import ruff  # noqa: F401
    except ImportError:
        pytest.fail("ruff is not installed: `pip install ruff` (scripts/install.sh does)")
    return [sys.executable, "-m", "ruff"]


def test_ruff_finds_nothing():
    folders = [f for f in FOLDERS if (ROOT / f).is_dir()]
    proc = subprocess.run([*_ruff(), "check", "--no-cache", "--output-format", "concise",
                           *folders], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
