"""The import contract: each top-level folder is a stage, and imports run downstream only.

    dsl  <-  compiler  <-  passes, backends  <-  qspec

`passes` and `backends` never import each other, nor do the backends inside `backends/`. Every
import counts: module level, inside functions and under TYPE_CHECKING. `make lint` runs this
file too. (import-linter cannot see this layout: the folders install under `qspec.` through
setuptools' package-dir mapping, which its graph builder does not follow.)
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("dsl", "compiler", "passes", "backends", "qspec")
ALLOWED = {
    "dsl": {"dsl"},
    "compiler": {"dsl", "compiler"},
    "passes": {"dsl", "compiler", "passes"},
    "backends": {"dsl", "compiler", "backends"},
    "qspec": set(STAGES),
}
BACKENDS = ("onnx", "tvm")  # independent of each other


def module_name(path: Path, root: Path) -> str:
    """The dotted name a file of the repository installs as (`passes/gptq.py`:
    `qspec.passes.gptq`; the `qspec/` folder is the package itself)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    if parts[0] == "qspec":
        parts.pop(0)
    return ".".join(["qspec", *parts])


def imported(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every qspec import in the file, relative ones resolved."""
    tree = ast.parse(path.read_text(), str(path))
    package = module_name(path, root).split(".")
    if path.name != "__init__.py":
        package.pop()
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + [base] * bool(base))
            names = [f"{base}.{alias.name}" for alias in node.names]
            found += [(node.lineno, name) for name in names]
    return [(line, name) for line, name in found if name.split(".")[0] == "qspec"]


def stage_of(module: str) -> str:
    """The folder a `qspec.*` module lives in (`qspec.driver` is in `qspec/`)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in STAGES[:-1] else "qspec"


def violations(root: Path = ROOT) -> list[str]:
    found = []
    for stage in STAGES:
        for path in sorted((root / stage).rglob("*.py")):
            name = module_name(path, root)
            for line, target in imported(path, root):
                where = f"{path.relative_to(root)}:{line}"
                if stage_of(target) not in ALLOWED[stage]:
                    found.append(f"{where}: {stage}/ imports {target}")
                own = [b for b in BACKENDS if f"{name}.".startswith(f"qspec.backends.{b}.")]
                other = [b for b in BACKENDS if target.startswith(f"qspec.backends.{b}")]
                if stage == "backends" and own and other and own != other:
                    found.append(f"{where}: backend {own[0]} imports backend {other[0]}")
    return found


def test_imports_run_downstream_only():
    assert violations() == []


def test_pipeline_passes_do_not_import_each_other():
    """Each pass reads the State, not another pass: they compose in any order the driver picks."""
    passes = ("calibrate", "sparsify", "quantize", "compensate")
    for name in passes:
        targets = {target for _, target in imported(ROOT / "passes" / f"{name}.py", ROOT)}
        others = {f"qspec.passes.{other}" for other in passes if other != name}
        assert not targets & others, name


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        (
            "from qspec.passes import methods\n",
            ["dsl/probe.py:1: dsl/ imports qspec.passes.methods"],
        ),
        ("def f():\n    import qspec.driver\n", ["dsl/probe.py:2: dsl/ imports qspec.driver"]),
        ("from . import ir\n", []),
        ("from ..compiler import state\n", ["dsl/probe.py:1: dsl/ imports qspec.compiler.state"]),
    ],
)
def test_the_contract_catches_what_it_forbids(source: str, expected: list[str], tmp_path: Path):
    """The checker itself: a forbidden import in a function or a relative one is caught."""
    for stage in STAGES:
        (tmp_path / stage).mkdir()
    (tmp_path / "dsl" / "probe.py").write_text(source)
    assert violations(tmp_path) == expected


def test_backends_stay_apart(tmp_path: Path):
    for stage in STAGES:
        (tmp_path / stage).mkdir()
    (tmp_path / "backends" / "tvm").mkdir()
    (tmp_path / "backends" / "tvm" / "probe.py").write_text("from qspec.backends.onnx import ops\n")
    assert violations(tmp_path) == ["backends/tvm/probe.py:1: backend tvm imports backend onnx"]


if __name__ == "__main__":
    problems = violations()
    print("\n".join(problems) or "imports run downstream only")
    raise SystemExit(1 if problems else 0)
