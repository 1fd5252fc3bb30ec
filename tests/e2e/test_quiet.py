"""A normal run prints our lines, not MLflow's or Optuna's internals; --verbose shows them all."""
import subprocess
import sys

import pytest

from helpers import REPO, subprocess_env, write_idx_dir

NOISE = {
    "dataset-source UserWarning": "The specified dataset source can be interpreted in multiple ways",
    "MLflow INFO lines": "INFO mlflow.",
    "Optuna INFO lines": "[I ",
}
# Both steps in one process: the interpreter and its imports are most of each step's time.
SCRIPT = """
import sys
from pipelines import prepare, tune
extra = sys.argv[2:]
assert prepare.cli(["--source", sys.argv[1], *extra]) == 0
assert tune.cli(["--workers", "0", "--n-trials", "1", "--source", sys.argv[1], *extra]) == 0
"""


@pytest.mark.parametrize("verbose", [False, True])
def test_a_normal_run_is_quiet_and_verbose_shows_all(verbose, tmp_path):
    source = write_idx_dir(tmp_path / "idx", n_train=200, n_test=50)
    # A cache of its own: the new store's migrations (MLflow's INFO lines) run once more, to be shown or not.
    env = subprocess_env(tmp_path) | {"PYTHONPATH": str(REPO), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    env.pop("CNNEXP_VERBOSE", None)
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(source), *(["--verbose"] if verbose else [])],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    output = done.stdout + done.stderr
    for what, text in NOISE.items():
        assert (text in output) == verbose, f"{what}: {output[-2000:]}"
    assert "prepared fashion-mnist" in done.stdout and "study 'cnnexp-tune' ready" in done.stdout


def test_optunas_experimental_warnings_are_silenced_unless_verbose(monkeypatch):
    import warnings

    import optuna

    from cnnexp.tuning.study import quiet_optuna

    monkeypatch.delenv("CNNEXP_VERBOSE", raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_optuna()  # what opening any storage does first, in every worker process too
        warnings.warn("heartbeat_interval is experimental", optuna.exceptions.ExperimentalWarning)
    assert not caught
