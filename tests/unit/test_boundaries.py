"""The house's import rules: the core knows nothing of MLflow or Optuna, tracking never reaches into tuning,
pipelines reach MLflow and Optuna only through cnnexp, the model loader is light, and nothing imports in a circle."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO

CORE = ("checks", "config", "data", "idx", "locks", "model", "train", "evaluate", "plots", "serving", "devices", "engine",
        "slots", "schedule", "fused", "checkpoint", "processes", "verbosity", "ranking", "errors", "onnx_export")


def _imported(path: Path) -> set[str]:
    """Every module a file imports (at module level or inside functions), as dotted names."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _project_graph() -> dict[str, set[str]]:
    files = [*REPO.glob("cnnexp/**/*.py"), *REPO.glob("pipelines/**/*.py")]
    names = {_module_name(f) for f in files}
    return {_module_name(f): {m for m in _imported(f) if m in names and m != _module_name(f)} for f in files}


def test_the_core_imports_neither_mlflow_nor_optuna_nor_the_tracking_and_tuning_packages():
    for name in CORE:
        imported = _imported(REPO / "cnnexp" / f"{name}.py")
        banned = {m for m in imported if m.split(".")[0] in ("mlflow", "optuna")
                  or m.startswith(("cnnexp.tracking", "cnnexp.tuning"))}
        assert not banned, f"cnnexp.{name} imports {banned}"


def test_tracking_never_imports_tuning_and_pipelines_never_import_mlflow_or_optuna():
    for path in REPO.glob("cnnexp/tracking/*.py"):
        assert not {m for m in _imported(path) if m.startswith("cnnexp.tuning")}, path
    for path in REPO.glob("pipelines/*.py"):
        assert not {m for m in _imported(path) if m.split(".")[0] in ("mlflow", "optuna")}, path


def test_no_module_imports_in_a_circle():
    graph = _project_graph()
    done, stack = set(), []

    def visit(name):
        if name in stack:
            pytest.fail("import circle: " + " -> ".join(stack[stack.index(name):] + [name]))
        if name in done:
            return
        stack.append(name)
        for target in sorted(graph.get(name, ())):
            visit(target)
        stack.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)


def test_only_main_and_tune_run_other_entry_points_as_steps():
    steps = {"pipelines.prepare", "pipelines.train", "pipelines.evaluate"}
    for name, targets in _project_graph().items():
        if name.startswith("pipelines.") and name not in ("pipelines.main", "pipelines.tune", "pipelines.cli"):
            assert not targets & (steps | {"pipelines.tune", "pipelines.worker"}), f"{name} imports {targets & steps}"


def test_no_file_of_the_library_is_over_350_lines():
    long = {str(p.relative_to(REPO)): n for p in REPO.glob("cnnexp/**/*.py") if (n := len(p.read_text().splitlines())) > 350}
    assert not long


@pytest.mark.parametrize("modules, absent", [
    # The core, run for real: nothing it imports pulls MLflow or Optuna in either.
    (", ".join(f"cnnexp.{name}" for name in CORE), ("mlflow", "optuna")),
    # torchvision imports torch._dynamo: seconds of start-up for every spawned tuning worker.
    ("pipelines.train, pipelines.worker, pipelines.evaluate, cnnexp.tuning.workers", ("torchvision", "torch._dynamo")),
    # matplotlib (half a second) loads where a figure is drawn, not on the way to a study's first step.
    ("pipelines.train, pipelines.tune, pipelines.worker", ("matplotlib",)),
    # The model's loader: what loading a model costs, and no plotting backend switched under a notebook.
    ("cnnexp.tracking.pyfunc", ("matplotlib", "optuna", "cnnexp.plots", "cnnexp.tracking.log")),
])
def test_modules_import_without(modules, absent):
    code = f"import sys, {modules}; print(sorted(m for m in {absent!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert out.strip() == "[]"


def test_one_module_of_the_library_trains():
    """One training loop: gradients are taken in the engine's slot tables alone (fit and tuning both run them)."""
    training = sorted(str(path.relative_to(REPO)) for path in (REPO / "cnnexp").rglob("*.py")
                      if ".backward(" in path.read_text() or "autograd.grad(" in path.read_text())
    assert training == ["cnnexp/slots.py"]
