"""Fixtures of the end-to-end tests: one PostgreSQL + `mlflow server` for the whole session."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from helpers import INITDB, REPO, free_port


@pytest.fixture(scope="session")
def cluster():
    """PostgreSQL + `mlflow server` (PostgreSQL backend, proxied artifacts) by scripts/local-cluster.sh, once."""
    if not INITDB:
        pytest.skip("PostgreSQL server binaries absent (/usr/lib/postgresql/*/bin/initdb): apt-get install postgresql")
    # Not under pytest's tmp_path: as root the cluster belongs to `postgres`, which cannot enter root's 0700 dirs.
    directory = Path(tempfile.mkdtemp(prefix="cnnexp-cluster-"))
    directory.chmod(0o755)
    env = {**os.environ, "PGPORT": str(free_port()), "MLFLOW_PORT": str(free_port()),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    script = [str(REPO / "scripts" / "local-cluster.sh")]
    up = subprocess.run(script + ["up", str(directory)], env=env, capture_output=True, text=True, timeout=400)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        exports = dict(line.removeprefix("export ").split("=", 1) for line in up.stdout.splitlines()
                       if line.startswith("export "))
        yield {**exports, "PGPORT": env["PGPORT"]}
    finally:
        subprocess.run(script + ["down", str(directory)], env=env, capture_output=True, timeout=120)
        shutil.rmtree(directory, ignore_errors=True)
