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


def _imports(path: pathlib.Path) -> set[str]:
    """Absolute names of the modules a file imports (relative imports resolved)."""
    import ast

    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    if path.name == "__init__.py":
        package = ".".join(path.relative_to(ROOT).parts[:-1])
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            out |= {f"{base}.{a.name}" for a in node.names} | {base}
    return out


# What passes/ may import from qexport, and the qexport modules that may import passes/
# (the API layer the pipeline runs: quantize, rebuild).
PASSES_MAY_IMPORT = ("qexport.ops", "qexport.contract", "qexport.graph")
MAY_IMPORT_PASSES = ("qexport/api.py", "qexport/pipeline.py")


def test_import_graph_is_one_way():
    for path in sorted((ROOT / "passes").rglob("*.py")):
        bad = [m for m in _imports(path) if m.startswith("qexport") and m != "qexport"
               and not m.startswith(PASSES_MAY_IMPORT)]
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"
    for path in sorted((ROOT / "qexport").rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        if rel not in MAY_IMPORT_PASSES:
            bad = [m for m in _imports(path) if m == "passes" or m.startswith("passes.")]
            assert not bad, f"{rel} imports {bad}"
