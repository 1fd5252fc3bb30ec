"""Bad input a user can give each entry point: one clear line naming it, a non-zero exit, no run left RUNNING
and no new file a later step would trust. The config rules themselves are tested in tests/unit/test_config.py
(one CLI case per entry point here); these are the cases that need a store, files or earlier runs."""

import os
import subprocess

import mlflow.pyfunc
import pytest
from mlflow.tracking import MlflowClient

from cnnexp.tracking import log
from helpers import BAD_FILES, EXPECTED_FILE, write_idx_dir
from pipelines import compare, evaluate, main, prepare, train, tune, worker

COMMANDS = {"prepare": prepare.cli, "train": train.cli, "evaluate": evaluate.cli, "tune": tune.cli, "main": main.cli,
            "worker": worker.cli, "compare": compare.cli}
# When the input is refused: before any run starts (train's and evaluate's data too, which they need before
# they begin), or once a run has started and reads it (prepare's source and data_dir are its work: that run
# ends FAILED with the line as its reason). Either way the exit code is 2: bad input, not a failure.
BAD, IN_RUN = "before a run", "in its run"


def _file_under_a_regular_file(tmp):
    (tmp / "plain").write_text("not a directory")
    return str(tmp / "plain" / "data")


def _a_regular_file(tmp):
    (tmp / "afile").write_text("not a directory")
    return str(tmp / "afile")


def _corrupt_manifest(tmp):
    """Data prepared in tmp/data whose manifest.json is then cut short; returns the args that reach it."""
    args = ["--data-dir", str(tmp / "data"), "--source", str(write_idx_dir(tmp / "idx"))]
    assert prepare.cli(args) == 0
    manifest = tmp / "data" / "fashion-mnist" / "manifest.json"
    manifest.write_text(manifest.read_text()[:40])
    return args[:2]


class _Echo(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input: list[str]) -> list[str]:  # hinted: MLflow warns otherwise
        return model_input


def _foreign_model(tmp):
    """A run whose model is a plain pyfunc, not cnnexp's; returns its bare run id."""
    with mlflow.start_run() as run:
        mlflow.pyfunc.log_model(name="model", python_model=_Echo(), pip_requirements=[])
    return run.info.run_id


def _bad_source(case):
    def setup(tmp):
        source = write_idx_dir(tmp / f"idx-{case}")
        BAD_FILES[case](source)
        return ["--source", str(source)]

    return setup


def _run_of(entry, *args):
    """Makes a finished `entry` run; returns its id."""
    def make(tmp):
        assert COMMANDS[entry]([*args, "--source", str(write_idx_dir(tmp / "idx"))]) == 0
        return MlflowClient().search_runs(["0"], order_by=["attributes.start_time DESC"])[0].info.run_id
    return make


def _study_of(tmp, *settings):
    """Creates a study with one trial (a study waiting for workers would leave its parent RUNNING);
    returns the args that reach its data."""
    source = ["--source", str(write_idx_dir(tmp / "idx", n_train=100, n_test=20))]
    assert tune.cli(["--n-trials", "1", *settings, *source]) == 0
    return source


def _killed_train_run(tmp):
    """A train run interrupted after its first checkpoint; returns its id."""
    log_epoch = log.log_epoch
    log.log_epoch = _interrupt
    try:
        assert train.cli(["--epochs", "2", "--lr", "0.001", "--source", str(write_idx_dir(tmp / "idx"))]) == 130
    finally:
        log.log_epoch = log_epoch
    return MlflowClient().search_runs(["0"])[0].info.run_id


def _interrupt(metrics):
    raise KeyboardInterrupt


# case -> (command, args or setup(tmp) -> args, exit code, message)
CASES = {
    # prepare
    "prepare dataset unknown": ("prepare", ["--dataset", "cifar"], BAD, "dataset: unknown value 'cifar'; allowed: fashion-mnist"),
    "prepare source missing dir": ("prepare", lambda t: ["--source", str(t / "nowhere")], IN_RUN, "source: "),
    "prepare source empty dir": ("prepare", lambda t: ["--source", str((t / "empty").mkdir() or t / "empty")], IN_RUN, "missing (expected train-images-idx3-ubyte"),
    **{f"prepare source {case}": ("prepare", _bad_source(case), IN_RUN, EXPECTED_FILE[case]) for case in BAD_FILES},
    "prepare data_dir under a file": ("prepare", lambda t: ["--data-dir", _file_under_a_regular_file(t), "--source", str(write_idx_dir(t / "idx"))], BAD, "data_dir: cannot create"),
    "prepare data_dir is a file": ("prepare", lambda t: ["--data-dir", _a_regular_file(t), "--source", str(write_idx_dir(t / "idx"))], BAD, "afile is a file, not a directory"),
    # train
    "train lr zero": ("train", ["--lr", "0"], BAD, "lr: must be a finite positive number"),
    "train data_dir under a file": ("train", lambda t: ["--data-dir", _file_under_a_regular_file(t), "--source", str(write_idx_dir(t / "idx"))], BAD, "data_dir: cannot create"),
    "train data_dir is a file": ("train", lambda t: ["--data-dir", _a_regular_file(t)], BAD, "afile is a file, not a directory"),
    "train data_dir with a corrupt manifest": ("train", _corrupt_manifest, BAD, "fashion-mnist/manifest.json is corrupt"),
    "train source missing dir": ("train", lambda t: ["--source", str(t / "nowhere")], BAD, "source: "),
    "train resume unknown run": ("train", ["--resume", "0123abc"], BAD, "resume: no run '0123abc' in sqlite:"),
    "train resume a prepare run": ("train", lambda t: ["--resume", _run_of("prepare")(t)], BAD, "is not a train run"),
    "train resume a finished run": ("train", lambda t: ["--resume", _run_of("train", "--epochs", "1")(t)], BAD, "is FINISHED; only KILLED or FAILED"),
    "train resume other lr": ("train", lambda t: ["--resume", _killed_train_run(t), "--lr", "0.1"], BAD, "lr: run "),
    # evaluate
    "evaluate model_uri empty": ("evaluate", ["--model-uri", ""], BAD, "model_uri: must not be empty"),
    "evaluate model_uri unknown run": ("evaluate", ["--model-uri", "runs:/abc/model"], BAD, "model_uri: no model at 'runs:/abc/model'"),
    "evaluate bare unknown run id": ("evaluate", ["--model-uri", "abc"], BAD, "model_uri: no model at 'runs:/abc/model'"),
    "evaluate a model not cnnexp's": ("evaluate", lambda t: ["--model-uri", _foreign_model(t)], BAD, "is not a cnnexp model (flavors: python_function)"),
    "evaluate data not prepared": ("evaluate", lambda t: ["--model-uri", _run_of("train", "--epochs", "1")(t), "--data-dir", str(t / "elsewhere")], BAD, "data_dir: no prepared fashion-mnist data"),
    # tune
    "tune n_trials zero": ("tune", ["--n-trials", "0"], BAD, "n_trials: must be at least 1"),
    # main, worker, compare: one case each (their rules are the configs', tested in tests/unit/test_config.py)
    "main epochs zero": ("main", ["--epochs", "0"], BAD, "epochs: must be at least 1"),
    "worker workers zero": ("worker", ["--workers", "0"], BAD, "workers: must be at least 1"),
    "compare plot without output": ("compare", ["--plot", "true"], BAD, "plot: needs output"),
    "tune setting differs from the study's": ("tune", lambda t: [*_study_of(t, "--epochs", "2"), "--epochs", "3"], BAD, "epochs: study 'cnnexp-tune' was created with epochs=2, got 3"),
    "tune storage in a missing directory": ("tune", lambda t: ["--storage", str(t / "nowhere" / "journal.log")], BAD, "nowhere does not exist; create it"),
    "tune storage unreachable": ("tune", lambda t: ["--storage", "postgresql://tuner:s3cret@127.0.0.1:9/optuna", "--source", str(write_idx_dir(t / "idx"))], BAD, "storage: cannot open postgresql://tuner:***@127.0.0.1:9/optuna"),
}


def _files(root):
    return {p for p in root.rglob("*") if p.is_file() and "mlruns" not in p.parts and not p.name.startswith("mlflow.db")}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gets_one_line_a_nonzero_exit_and_leaves_nothing_half_done(case, workdir, capsys):
    command, args, code, message = CASES[case]
    args = args(workdir) if callable(args) else args
    before, runs_before = _files(workdir), len(MlflowClient().search_runs(["0"]))
    capsys.readouterr()
    assert COMMANDS[command](args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in err and err.startswith(f"{command}: error: "), err
    runs = MlflowClient().search_runs(["0"])
    assert all(r.info.status != "RUNNING" for r in runs)
    if code == BAD:
        assert len(runs) == runs_before  # refused before a run started
    else:
        assert runs[0].info.status == "FAILED" and message in runs[0].data.tags["error"]
    assert all(p.name.endswith(".lock") for p in _files(workdir) - before)  # nothing a later step would read


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory this user cannot write: chmod for a user, a read-only tmpfs for root (whom modes do not stop)."""
    path = tmp_path / "read-only"
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o500)
        yield path
        path.chmod(0o700)
        return
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(path)]).returncode != 0:
        pytest.skip("root, but no mount: no read-only directory to be had")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_a_read_only_checkpoint_dir_is_refused_before_epoch_1_with_its_own_advice(read_only_dir, workdir, idx_source,
                                                                                  capsys):
    checkpoints = read_only_dir / "checkpoints"
    assert train.cli(["--checkpoint-dir", str(checkpoints), "--source", str(idx_source)]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"train: error: checkpoint_dir: cannot write in {read_only_dir} (")
    assert line.endswith("; choose a checkpoint_dir you can write")
    assert not MlflowClient().search_runs(["0"])  # refused before the run, so before its first epoch
