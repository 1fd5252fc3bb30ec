"""README's own commands against a tracking server that is not there (refused) or never answers (silent):
one line naming MLFLOW_TRACKING_URI and exit 2 within 30 s, under `mlflow run` (the preflight plugin) and `cnnexp`."""
import socket
import subprocess
import sys
import time

import pytest

from helpers import REPO, mlflow_run_command, subprocess_env


@pytest.fixture(scope="module")
def silent_port():
    """A server that accepts connections and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield sock.getsockname()[1]


def _port(kind, silent_port):
    return 9 if kind == "refused" else silent_port  # nothing listens on the discard port here


@pytest.mark.parametrize("kind, entry", [("refused", "train"), ("silent", "train"), ("refused", "tune")])
def test_mlflow_run_against_a_dead_server_fails_in_one_line_within_30_s(kind, entry, silent_port, tmp_path):
    env = subprocess_env(tmp_path) | {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{_port(kind, silent_port)}",
                                      "MLFLOW_EXPERIMENT_NAME": "walkthrough"}
    started = time.monotonic()
    done = subprocess.run(mlflow_run_command(entry, epochs=1), cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    seconds = time.monotonic() - started
    print(f"{kind} server, mlflow run -e {entry}: exit {done.returncode} after {seconds:.1f} s")
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-3000:]
    assert lines[0].startswith("mlflow run: error: MLFLOW_TRACKING_URI: the tracking server http://127.0.0.1:")
    assert ("Connection refused" if kind == "refused" else "timed out") in lines[0]
    assert seconds < 30


@pytest.mark.parametrize("kind", ["refused", "silent"])
def test_cnnexp_against_a_dead_server_fails_in_one_line_within_30_s(kind, silent_port, tmp_path):
    env = subprocess_env(tmp_path) | {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{_port(kind, silent_port)}"}
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "pipelines.cli", "train", "--epochs", "1"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    seconds = time.monotonic() - started
    print(f"{kind} server, cnnexp train: exit {done.returncode} after {seconds:.1f} s")
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "MLFLOW_TRACKING_URI" in lines[0], done.stderr[-3000:]
    assert seconds < 30
