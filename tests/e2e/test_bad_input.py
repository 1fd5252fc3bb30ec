"""Every parameter a user can type, wrong: one clear line naming it, a non-zero exit, no run left
RUNNING and no new file a later step would trust. One table; the lead extends it to new entry points."""
import shutil
import subprocess

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from cnnexp.tracking import log
from helpers import BAD_FILES, EXPECTED_FILE, mlflow_run_command, subprocess_env, write_idx_dir
from pipelines import evaluate, prepare, train, tune

COMMANDS = {"prepare": prepare.cli, "train": train.cli, "evaluate": evaluate.cli, "tune": tune.cli}
BAD, FAILED = 2, 1  # exit codes: a parameter refused before any work / a failure while working


def _file_under_a_regular_file(tmp):
    (tmp / "plain").write_text("not a directory")
    return str(tmp / "plain" / "data")


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
    "prepare source missing dir": ("prepare", lambda t: ["--source", str(t / "nowhere")], FAILED, "source: "),
    "prepare source empty dir": ("prepare", lambda t: ["--source", str((t / "empty").mkdir() or t / "empty")], FAILED, "missing (expected train-images-idx3-ubyte"),
    **{f"prepare source {case}": ("prepare", _bad_source(case), FAILED, EXPECTED_FILE[case]) for case in BAD_FILES},
    "prepare flag abbreviated": ("prepare", ["--val-frac", "0.2"], BAD, "arguments: unknown parameter --val-frac"),
    "prepare data_dir empty": ("prepare", ["--data-dir", ""], BAD, "data_dir: must not be empty"),
    "prepare data_dir under a file": ("prepare", lambda t: ["--data-dir", _file_under_a_regular_file(t), "--source", str(write_idx_dir(t / "idx"))], FAILED, "data_dir: cannot create"),
    "prepare val_fraction 0": ("prepare", ["--val-fraction", "0"], BAD, "val_fraction: must be between 0 and 1"),
    "prepare val_fraction 1": ("prepare", ["--val-fraction", "1"], BAD, "val_fraction: must be between 0 and 1"),
    "prepare val_fraction negative": ("prepare", ["--val-fraction", "-0.1"], BAD, "val_fraction: must be between 0 and 1"),
    "prepare val_fraction text": ("prepare", ["--val-fraction", "abc"], BAD, "val_fraction: invalid float value: 'abc'"),
    "prepare seed negative": ("prepare", ["--seed", "-1"], BAD, "seed: must be between 0 and 2**32 - 1"),
    "prepare seed text": ("prepare", ["--seed", "abc"], BAD, "seed: invalid int value: 'abc'"),
    # train
    "train flag abbreviated": ("train", ["--epoch", "1"], BAD, "arguments: unknown parameter --epoch (not one of train's"),
    "train flag unknown": ("train", ["--epochs", "1", "--learning-rate", "0.1"], BAD, "unknown parameter --learning-rate"),
    "train lr zero": ("train", ["--lr", "0"], BAD, "lr: must be a positive number"),
    "train lr negative": ("train", ["--lr", "-1"], BAD, "lr: must be a positive number"),
    "train lr nan": ("train", ["--lr", "nan"], BAD, "lr: must be a positive number"),
    "train lr text": ("train", ["--lr", "abc"], BAD, "lr: invalid float value: 'abc'"),
    "train batch_size zero": ("train", ["--batch-size", "0"], BAD, "batch_size: must be at least 1"),
    "train batch_size fraction": ("train", ["--batch-size", "1.5"], BAD, "batch_size: invalid int value: '1.5'"),
    "train epochs zero": ("train", ["--epochs", "0"], BAD, "epochs: must be at least 1"),
    "train epochs text": ("train", ["--epochs", "abc"], BAD, "epochs: invalid int value: 'abc'"),
    "train keep unknown": ("train", ["--keep", "first"], BAD, "keep: unknown value 'first'; allowed: best, last"),
    "train seed too big": ("train", ["--seed", str(2**32)], BAD, "seed: must be between 0 and 2**32 - 1"),
    "train seed text": ("train", ["--seed", "abc"], BAD, "seed: invalid int value: 'abc'"),
    "train device unknown": ("train", ["--device", "tpu"], BAD, "device: unknown device 'tpu'; allowed: auto, cpu"),
    "train device bad index": ("train", ["--device", "cuda:x"], BAD, "device: unknown device 'cuda:x'"),
    "train dataset unknown": ("train", ["--dataset", "cifar"], BAD, "dataset: unknown value 'cifar'"),
    "train data_dir blank": ("train", ["--data-dir", " "], BAD, "data_dir: must not be empty"),
    "train data_dir under a file": ("train", lambda t: ["--data-dir", _file_under_a_regular_file(t), "--source", str(write_idx_dir(t / "idx"))], FAILED, "data_dir: cannot create"),
    "train source missing dir": ("train", lambda t: ["--source", str(t / "nowhere")], FAILED, "source: "),
    "train checkpoint_dir empty": ("train", ["--checkpoint-dir", ""], BAD, "checkpoint_dir: must not be empty"),
    "train resume unknown run": ("train", ["--resume", "0123abc"], BAD, "resume: no run '0123abc' in sqlite:"),
    "train resume path": ("train", ["--resume", "../../etc"], BAD, "resume: '../../etc' is not a run id"),
    "train resume a prepare run": ("train", lambda t: ["--resume", _run_of("prepare")(t)], BAD, "is not a train run"),
    "train resume a finished run": ("train", lambda t: ["--resume", _run_of("train", "--epochs", "1")(t)], BAD, "is FINISHED; only KILLED or FAILED"),
    "train resume other lr": ("train", lambda t: ["--resume", _killed_train_run(t), "--lr", "0.1"], BAD, "lr: run "),
    # evaluate
    "evaluate flag abbreviated": ("evaluate", ["--model", "abc"], BAD, "unknown parameter --model"),
    "evaluate model_uri empty": ("evaluate", ["--model-uri", ""], BAD, "model_uri: must not be empty"),
    "evaluate model_uri unknown run": ("evaluate", ["--model-uri", "runs:/abc/model"], BAD, "model_uri: no model at 'runs:/abc/model'"),
    "evaluate bare unknown run id": ("evaluate", ["--model-uri", "abc"], BAD, "model_uri: no model at 'runs:/abc/model'"),
    "evaluate split unknown": ("evaluate", ["--model-uri", "abc", "--split", "train"], BAD, "split: unknown value 'train'; allowed: test, val"),
    "evaluate dataset unknown": ("evaluate", ["--model-uri", "abc", "--dataset", "cifar"], BAD, "dataset: unknown value 'cifar'"),
    "evaluate device unknown": ("evaluate", ["--model-uri", "abc", "--device", "tpu"], BAD, "device: unknown device 'tpu'"),
    "evaluate data not prepared": ("evaluate", lambda t: ["--model-uri", _run_of("train", "--epochs", "1")(t), "--data-dir", str(t / "elsewhere")], FAILED, "data_dir: no prepared fashion-mnist data"),
    # tune
    "tune flag abbreviated": ("tune", ["--n-trial", "1"], BAD, "unknown parameter --n-trial"),
    "tune n_trials zero": ("tune", ["--n-trials", "0"], BAD, "n_trials: must be at least 1"),
    "tune n_trials text": ("tune", ["--n-trials", "abc"], BAD, "--n-trials/--n_trials: invalid int value: 'abc'"),
    "tune timeout negative": ("tune", ["--timeout", "-1"], BAD, "timeout: must be 0 (no limit) or a positive number"),
    "tune epochs zero": ("tune", ["--epochs", "0"], BAD, "epochs: must be at least 1"),
    "tune lr range inverted": ("tune", ["--lr-min", "0.1", "--lr-max", "0.01"], BAD, "lr_min: must be below lr_max"),
    "tune lr_min zero": ("tune", ["--lr-min", "0"], BAD, "lr_min: must be a positive number"),
    "tune batch_min not a power of two": ("tune", ["--batch-min", "12"], BAD, "batch_min: must be a power of two"),
    "tune batch range inverted": ("tune", ["--batch-min", "256", "--batch-max", "64"], BAD, "batch_min: must not exceed batch_max (64)"),
    "tune sampler unknown": ("tune", ["--sampler", "grid"], BAD, "sampler: unknown value 'grid'; allowed: tpe, random"),
    "tune pruner unknown": ("tune", ["--pruner", "foo"], BAD, "pruner: unknown value 'foo'; allowed: asha, median, hyperband, none"),
    "tune workers negative": ("tune", ["--workers", "-1"], BAD, "workers: must be 0 (run no trials here) or more"),
    "tune storage empty": ("tune", ["--storage", ""], BAD, "storage: must not be empty"),
    "tune study_name empty": ("tune", ["--study-name", ""], BAD, "study_name: must not be empty"),
    "tune retrain_best not a bool": ("tune", ["--retrain-best", "maybe"], BAD, "retrain-best/--retrain_best: expected true or false"),
    "tune device unknown": ("tune", ["--device", "tpu"], BAD, "device: unknown device 'tpu'"),
    "tune setting differs from the study's": ("tune", lambda t: [*_study_of(t, "--epochs", "2"), "--epochs", "3"], BAD, "epochs: study 'cnnexp-tune' was created with epochs=2, got 3"),
    "tune storage in a missing directory": ("tune", lambda t: ["--storage", str(t / "nowhere" / "journal.log")], BAD, "nowhere does not exist; create it"),
    "tune storage unreachable": ("tune", lambda t: ["--storage", "postgresql://tuner:s3cret@127.0.0.1:9/optuna", "--source", str(write_idx_dir(t / "idx"))], BAD, "storage: cannot open postgresql://tuner:***@127.0.0.1:9/optuna"),
}


def _files(root):
    return {p for p in root.rglob("*") if p.is_file() and "mlruns" not in p.parts and not p.name.startswith("mlflow.db")}


@pytest.fixture(scope="module")
def migrated_db(tmp_path_factory):
    """An empty MLflow store made once: creating its tables is most of a small case's time."""
    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(path.parent)  # the default experiment's artifacts go to ./mlruns as of now: not the checkout's
        MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def workdir(workdir, migrated_db):
    shutil.copy(migrated_db, workdir / "mlflow.db")
    return workdir


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gets_one_line_a_nonzero_exit_and_leaves_nothing_half_done(case, workdir, capsys):
    command, args, code, message = CASES[case]
    args = args(workdir) if callable(args) else args
    before, runs_before = _files(workdir), len(MlflowClient().search_runs(["0"]))
    capsys.readouterr()
    assert COMMANDS[command](args) == code
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in err and err.startswith(f"{command}: error: "), err
    runs = MlflowClient().search_runs(["0"])
    assert all(r.info.status != "RUNNING" for r in runs)
    if code == BAD:
        assert len(runs) == runs_before  # refused before a run started
    else:
        assert runs[0].info.status == "FAILED" and message in runs[0].data.tags["error"]
    assert all(p.name.endswith(".lock") for p in _files(workdir) - before)  # nothing a later step would read


# The string-typed path: MLflow passes every -P value as text and checks neither ints nor floats.
MLFLOW_RUN_CASES = {
    "prepare val_fraction text": ("prepare", {"val_fraction": "abc"}, "val_fraction: invalid float value: 'abc'"),
    "train batch_size fraction": ("train", {"batch_size": "1.5"}, "batch_size: invalid int value: '1.5'"),
    "train resume unknown run": ("train", {"resume": "0123abc"}, "resume: no run '0123abc'"),
    # MLflow passes an unknown -P name on as `--epoch 1`: refused, not read as --epochs.
    "train mistyped -P name": ("train", {"epoch": "1"}, "unknown parameter --epoch"),
}


@pytest.mark.parametrize("case", MLFLOW_RUN_CASES)
def test_bad_input_through_mlflow_run_fails_its_run_with_one_line(case, tmp_path):
    entry, params, message = MLFLOW_RUN_CASES[case]
    done = subprocess.run(
        mlflow_run_command(entry, data_dir=tmp_path / "data", **params),
        cwd=tmp_path, env=subprocess_env(tmp_path), capture_output=True, text=True, timeout=600,
    )
    assert done.returncode != 0
    ours = [line for line in done.stderr.splitlines() if line.startswith(f"{entry}: ")]
    assert len(ours) == 1 and message in ours[0], done.stderr[-2000:]
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = MlflowClient().search_runs(["0"])
    assert run.info.status == "FAILED" and message in run.data.tags["error"]
    assert run.info.run_name == entry  # not MLflow's random name
    assert not (tmp_path / "data").exists()
