"""A normal (non-editable) install: the wheel ships every package of the tree, and the CLI runs from it."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from helpers import REPO

# Every directory under cnnexp/ and pipelines/ that holds Python code is a package the wheel must ship.
SOURCE_PACKAGES = sorted(
    str(init.parent.relative_to(REPO)).replace(os.sep, ".")
    for top in ("cnnexp", "pipelines") for init in (REPO / top).rglob("__init__.py")
)


def _build_wheel(out: Path) -> Path:
    """Built from a copy of what the wheel is made of: setuptools builds inside the source tree, and a build/
    left there by an earlier build would ship modules the tree no longer has (and clutter the checkout)."""
    source = out.parent / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for top in ("cnnexp", "pipelines"):
        shutil.copytree(REPO / top, source / top, ignore=shutil.ignore_patterns("__pycache__"))
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(source)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = out.glob("cnnexp-*.whl")
    return wheel


def test_the_wheel_ships_every_package_and_the_cli_runs_from_a_plain_install(tmp_path, idx_source):
    wheel = _build_wheel(tmp_path / "dist")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = sorted({name.rpartition("/")[0].replace("/", ".") for name in names if name.endswith("/__init__.py")})
    assert "cnnexp.tracking" in SOURCE_PACKAGES and "cnnexp.tuning" in SOURCE_PACKAGES
    assert shipped == SOURCE_PACKAGES
    assert any(name.startswith("cnnexp/sample_data/") and name.endswith(".gz") for name in names)
    assert not any(name.startswith("tests/") for name in names)

    target = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # Only the installed copy is importable: not the checkout (cwd is elsewhere, PYTHONPATH is the target).
    env = {**os.environ, "PYTHONPATH": str(target), "MLFLOW_TRACKING_URI": f"sqlite:///{elsewhere / 'mlflow.db'}"}
    code = ("import sys, cnnexp, cnnexp.tracking.runs; assert cnnexp.__file__.startswith(sys.argv[1]), cnnexp.__file__; "
            "from pipelines.cli import main; sys.argv = ['cnnexp', *sys.argv[2:]]; sys.exit(main())")
    done = subprocess.run([sys.executable, "-c", code, str(target), "train", "--epochs", "1", "--batch-size", "50",
                           "--source", str(idx_source), "--data-dir", str(elsewhere / "data")],
                          cwd=elsewhere, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-1000:] + done.stderr[-2000:]
    assert "epoch   1/1" in done.stdout
