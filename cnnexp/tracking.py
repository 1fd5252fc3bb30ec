"""The one place that talks to MLflow: runs, params, per-epoch metrics, datasets, models, figures."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import platform
import re
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from collections.abc import Iterator

import mlflow
import mlflow.pyfunc
import mlflow.pytorch
import pandas as pd
import torch
from mlflow.entities import Metric, Param, Run, SourceType
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, DataType, Schema
from mlflow.utils.git_utils import get_git_commit, get_git_repo_url
from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_PARENT_RUN_ID, MLFLOW_SOURCE_NAME, MLFLOW_SOURCE_TYPE

from cnnexp.config import JUDGED_BY, RANKING_METRIC, ConfigError, first_line, verbose
from cnnexp.data import PreparedData, file_lock
from cnnexp.plots import learning_curves, samples_per_class

MODEL_NAME = "model"
PACKAGE_DIR = Path(__file__).resolve().parent


@functools.cache
def code_path() -> str:
    """cnnexp's modules as a model ships them (code_paths): the package without its 1.9 MB data sample."""
    target = Path(tempfile.mkdtemp(prefix="cnnexp-code-")) / "cnnexp"
    shutil.copytree(PACKAGE_DIR, target, ignore=shutil.ignore_patterns("sample_data", "__pycache__"))
    return str(target)
ERROR_TAG = "error"


@contextlib.contextmanager
def tracked_run(**kwargs) -> Iterator[mlflow.ActiveRun]:
    """Starts (or, under `mlflow run`, resumes) a run and always ends it with the status that happened.

    Inside another run (the main pipeline's steps) the new run is its child. Ending it never raises:
    when the store itself is what failed, the error that stopped the run is the one that matters.
    """
    global _runs_started
    kwargs.setdefault("nested", mlflow.active_run() is not None)
    if "run_id" not in kwargs and not os.environ.get("MLFLOW_RUN_ID"):  # a run resumed has its own source
        kwargs["tags"] = {**source_tags(), **kwargs.get("tags", {})}
    open_store()
    with mlflow.start_run(**kwargs) as run:
        _runs_started += 1
        try:
            yield run
        except KeyboardInterrupt:
            _flush_quietly()  # metrics of completed epochs may still sit in the async queue
            _end_quietly("KILLED")
            raise
        except BaseException as err:
            if store_problem() is None:  # a server that is gone would only make each write wait out its retries
                _flush_quietly()
                with contextlib.suppress(Exception):
                    MlflowClient().set_tag(run.info.run_id, ERROR_TAG, error_text(err))
            _end_quietly("FAILED")
            raise


_runs_started = 0
PROJECT_DIR = Path(__file__).resolve().parents[1]


@functools.cache
def source_tags() -> dict[str, str]:
    """The lineage tags `mlflow run` gives its runs (source name and type, git commit), for the runs
    `cnnexp` and tuning workers start themselves; without them a run cannot say which code made it."""
    tags = {MLFLOW_SOURCE_NAME: get_git_repo_url(str(PROJECT_DIR)) or PROJECT_DIR.as_uri(),
            MLFLOW_SOURCE_TYPE: SourceType.to_string(SourceType.PROJECT)}
    commit = get_git_commit(str(PROJECT_DIR))
    if commit is not None:  # an installed copy, outside any git checkout, has none
        tags[MLFLOW_GIT_COMMIT] = commit
    return tags


def runs_started() -> int:
    """How many runs this process has started (or resumed): whether an interruption ended one."""
    return _runs_started


def _end_quietly(status: str) -> None:
    # mlflow.end_run leaves the run before it writes the status, so a failed write ends it locally all the same.
    with contextlib.suppress(Exception):
        mlflow.end_run(status)


def open_store() -> None:
    """Creates a new sqlite store under a file lock.

    Several processes creating one store at once race through MLflow's table migrations and fail
    ("table _alembic_tmp_... already exists"); once it exists, concurrent runs are fine.
    """
    uri = mlflow.get_tracking_uri()
    if not uri.startswith("sqlite:///"):
        return
    path = Path(uri.removeprefix("sqlite:///").split("?")[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(path.with_name(f"{path.name}.lock")):
        MlflowClient().search_experiments(max_results=1)


# MLflow's own defaults (a 120 s timeout, 7 retries with exponential backoff) make each call to a server
# that is gone wait about four minutes. Ours: a call gives up after at most ~35 s (3 tries of 10 s, 1 s
# and 2 s apart), while a server that blinks (a restart) is still retried. A user's own values win.
HTTP_BOUNDS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "10", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
               "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
STORE_CHECK_TIMEOUT_S = 3


def bound_http_waits() -> None:
    """Applies HTTP_BOUNDS to this process and the workers it spawns (MLflow reads them at every call)."""
    for name, value in HTTP_BOUNDS.items():
        os.environ.setdefault(name, value)


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def store_problem() -> str | None:
    """Why the tracking server does not answer one quick request (one try, STORE_CHECK_TIMEOUT_S), or None.

    Only servers (http, https) are probed: a local store (sqlite, files) cannot hang on the network.
    """
    if not mlflow.get_tracking_uri().startswith(("http://", "https://")):
        return None
    try:
        with _env(MLFLOW_HTTP_REQUEST_TIMEOUT=str(STORE_CHECK_TIMEOUT_S), MLFLOW_HTTP_REQUEST_MAX_RETRIES="0"):
            MlflowClient().search_experiments(max_results=1)
    except Exception as err:  # noqa: BLE001 - connection refused, timeout, HTTP errors: all mean no store
        return _network_reason(err)
    return None


def _network_reason(err: BaseException) -> str:
    """The part of MLflow's long request error a user acts on ("Connection refused", "timed out")."""
    text = first_line(err)
    for pattern in (r"\[Errno -?\d+\] [^'\")]+", r"(Read|Connect) timed out", r"timed out", r"\d{3} [A-Z][\w ]+"):
        found = re.search(pattern, text)
        if found:
            return found.group(0).strip()
    return text[:200]


def check_store() -> None:
    """Refuses to start when the tracking server does not answer, within seconds, naming the setting."""
    problem = store_problem()
    if problem is not None:
        raise ConfigError("MLFLOW_TRACKING_URI", f"the tracking server {redact_url(mlflow.get_tracking_uri())} "
                                                 f"does not answer ({problem}); start it or point MLFLOW_TRACKING_URI "
                                                 "at one that runs")


def quiet_mlflow() -> None:
    """MLflow's INFO lines (store migrations) and its dataset-source warning stay out of a normal run's output.

    The warning: a local file path as a dataset source matches two registered source kinds, and MLflow
    says it picked one, at every log_input.
    """
    if verbose():
        return
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    # Its ERROR per failed background batch repeats what our one line says at the end of a run whose
    # server went away (what was not logged, and how to resume).
    logging.getLogger("mlflow.utils.async_logging").setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")


def _flush_quietly() -> None:
    with contextlib.suppress(Exception):
        mlflow.flush_async_logging()


def error_text(err: BaseException) -> str:
    """The error as a run tag holds it (MLflow caps tag values; 5,000 characters keeps us under)."""
    return f"{type(err).__name__}: {err}"[:5000]


def end_pending_run(status: str, err: BaseException | None = None, run_id: str | None = None) -> None:
    """Ends the run `mlflow run` created for us if our code never got to end it (e.g. bad parameters)."""
    run_id = run_id or os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return
    client = MlflowClient()
    with contextlib.suppress(Exception):  # the store itself may be what failed
        run = client.get_run(run_id)
        if run.info.status == "RUNNING":
            if err is not None:
                client.set_tag(run_id, ERROR_TAG, error_text(err))
            entry_point = run.data.tags.get("mlflow.project.entryPoint")
            if entry_point:  # our code never named it: the entry point, not MLflow's random name, says what it was
                client.set_tag(run_id, "mlflow.runName", entry_point)
            client.set_terminated(run_id, status)


def log_config(config) -> None:
    """Logs a config dataclass as params, skipping those `mlflow run` already logged (params are immutable)."""
    run = mlflow.active_run()
    already = MlflowClient().get_run(run.info.run_id).data.params
    params = {k: v for k, v in dataclasses.asdict(config).items() if k not in already}
    if params:
        mlflow.log_params(params)


def log_epoch(metrics: dict) -> None:
    """One batched, non-blocking write per epoch: the store's latency stays off the training loop."""
    values = {k: v for k, v in metrics.items() if k != "epoch"}
    mlflow.log_metrics(values, step=metrics["epoch"], synchronous=False)


def flush() -> None:
    mlflow.flush_async_logging()


def log_environment(device: torch.device, data: PreparedData) -> None:
    mlflow.set_tags(
        {
            "device": str(device),
            "torch_version": torch.__version__,
            "python_version": platform.python_version(),
            "data_digest": data.digest,
            "dataset": data.manifest["inputs"]["dataset"],
        }
    )


def split_dataset(data: PreparedData, name: str) -> mlflow.data.Dataset:
    """A prepared split as an MLflow dataset: named <dataset>-<split>, digest from its file's sha256."""
    entry, split = data.manifest["splits"][name], data.splits[name]
    return mlflow.data.from_numpy(
        features=split.images.numpy(),
        targets=split.labels.numpy(),
        source=str(data.path / entry["file"]),
        name=f"{data.manifest['inputs']['dataset']}-{name}",
        digest=entry["sha256"][:16],
    )


def log_prepared_data(data: PreparedData) -> None:
    for name in data.splits:
        mlflow.log_input(split_dataset(data, name), context=name)
    mlflow.log_table(
        {
            "class": data.classes,
            **{name: data.manifest["splits"][name]["per_class"] for name in data.splits},
        },
        artifact_file="per_class_counts.json",
    )
    mlflow.log_dict(data.manifest, "manifest.json")
    train = data.splits["train"]
    log_figure(samples_per_class(train.images, train.labels, data.classes), "samples_per_class.png")
    mlflow.set_tags({"data_digest": data.digest, "dataset": data.manifest["inputs"]["dataset"]})


def log_figure(fig, artifact_file: str) -> None:
    import matplotlib.pyplot as plt

    mlflow.log_figure(fig, artifact_file)
    plt.close(fig)


def log_learning_curves(history: list[dict]) -> None:
    log_figure(learning_curves(history), "learning_curves.png")


# Outputs only: a TensorSpec input would pin one dtype, and pyfunc enforces it strictly, so it
# would refuse either uint8 0-255 or float 0-1 images; the input example shows the uint8 form.
MODEL_SIGNATURE = ModelSignature(
    outputs=Schema([ColSpec(DataType.long, "class_index"), ColSpec(DataType.string, "class_name")])
)


def log_model(model: torch.nn.Module, example_inputs: torch.Tensor, classes: list[str] | None = None,
              step: int = 0) -> mlflow.models.model.ModelInfo:
    """Logs the network as one MLflow model with two faces, at `step` (the epoch its weights are from).

    mlflow.pytorch.load_model gives back the Network (float [N, 1, 28, 28] -> logits), pickled: MLflow's
    only other format, pt2 (torch.export), loads as a GraphModule, not a Network, that refuses .eval(),
    and needs a TensorSpec input signature, which pyfunc would enforce on the uint8 form.
    mlflow.pyfunc.load_model (and `mlflow models serve`) gives cnnexp.serving.ImageClassifier:
    28x28 images, uint8 0-255 or float 0-1 -> class_index, class_name, built from the weights alone
    (no unpickling; see _ClassifierFlavor). code_paths ships cnnexp inside the model so both load
    where cnnexp is not installed.
    """
    model = model.cpu().eval()
    classes = list(classes) if classes is not None else [str(i) for i in range(model.out.out_features)]
    images = (example_inputs[:2, 0].cpu() * 255).round().to(torch.uint8).numpy()
    return mlflow.models.Model.log(
        artifact_path=None, name=MODEL_NAME, flavor=_ClassifierFlavor, network=model, classes=classes,
        signature=MODEL_SIGNATURE, input_example=images, step=step,
    )


def log_kept_model(model: torch.nn.Module, example_inputs: torch.Tensor, classes: list[str], epoch: int,
                   summary: dict[str, float], val: mlflow.data.Dataset) -> mlflow.models.model.ModelInfo:
    """Into the active run: the validation data as an input, the model at step = the epoch its weights
    are from, and the run's summary metrics (best_val_accuracy, best_epoch).

    Logged at a step, the model gets the run's points of that step as its own metrics (MLflow links
    them itself), so its val_accuracy is its epoch's. They carry no dataset: the SQL store keeps none
    on run metrics, and a second, dataset-linked copy would collide with MLflow's on the model metric's
    key (name, step, timestamp) unless given a timestamp of its own, which would log every kept
    epoch's val point twice in the run's history.
    """
    mlflow.flush_async_logging()  # the points MLflow links must be in the store, not in the async queue
    mlflow.log_input(val, context="val")
    info = log_model(model, example_inputs, classes, step=epoch)
    mlflow.log_metrics(summary, synchronous=True)
    return info


def model_requirements() -> list[str]:
    """What loading the model imports, pinned to what trained it; stated rather than inferred,
    because MLflow's inference re-imports torch in a subprocess and took most of log_model's 10 s."""
    from importlib.metadata import version

    packages = ("mlflow", "torch", "torchvision", "numpy", "pandas", "matplotlib")
    return [f"{name}=={version(name).split('+')[0]}" for name in packages]


WEIGHTS_FILE = "weights.pt"  # the network's state dict, beside the pickled module in the model's data folder


class _ClassifierFlavor:
    """The `flavor` Model.log wants: the pytorch flavor, with pyfunc loading through _load_pyfunc below.

    The pyfunc face (pyfunc.load_model, `mlflow models serve`) reads only WEIGHTS_FILE, with
    torch.load(weights_only=True), into a fresh Network: serving never unpickles, so it also works
    with MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false. Only mlflow.pytorch.load_model reads the pickle.
    """

    @staticmethod
    def save_model(path: str, mlflow_model: mlflow.models.Model, network: torch.nn.Module, classes: list[str],
                   **kwargs) -> None:
        mlflow.pytorch.save_model(
            network, path, mlflow_model=mlflow_model, serialization_format="pickle", code_paths=[code_path()],
            pip_requirements=model_requirements(), **kwargs
        )
        pyfunc = mlflow_model.flavors[mlflow.pyfunc.FLAVOR_NAME]
        torch.save(network.state_dict(), os.path.join(path, pyfunc[mlflow.pyfunc.DATA], WEIGHTS_FILE))
        pyfunc[mlflow.pyfunc.MAIN] = __name__
        pyfunc["config"] = {"classes": classes}  # MLflow hands this to _load_pyfunc as model_config
        mlflow_model.save(os.path.join(path, "MLmodel"))


def _load_pyfunc(data_path: str, model_config: dict | None = None):
    """Called by mlflow.pyfunc.load_model with the model's data folder."""
    from cnnexp.model import Network
    from cnnexp.serving import ImageClassifier

    classes = model_config["classes"]
    network = Network(num_classes=len(classes))
    network.load_state_dict(torch.load(Path(data_path, WEIGHTS_FILE), map_location="cpu", weights_only=True))
    return _ServedClassifier(ImageClassifier(network, classes))


class _ServedClassifier:
    """ImageClassifier as MLflow serves it: bad input (shape, dtype, pixel range) is the caller's error.

    The scoring server answers an MlflowException with its message and HTTP status; any other exception
    becomes a generic message, with the reason only in the stack trace.
    """

    def __init__(self, classifier):
        self.classifier = classifier

    def predict(self, batch, params: dict | None = None) -> pd.DataFrame:
        try:
            return self.classifier.predict(batch, params)
        except ValueError as err:
            raise MlflowException(str(err), error_code=INVALID_PARAMETER_VALUE) from err


def set_tags(tags: dict[str, str]) -> None:
    mlflow.set_tags(tags)


# --- tuning: child runs written with the client, so several processes can log under one parent ---

def active_run_ids() -> tuple[str, str]:
    """(run id, experiment id) of the active run: what worker processes need to log children under it."""
    info = mlflow.active_run().info
    return info.run_id, info.experiment_id


def start_child_run(parent_run_id: str, experiment_id: str, run_name: str, params: dict, tags: dict) -> str:
    client = MlflowClient()
    run = client.create_run(experiment_id, run_name=run_name,
                            tags={**source_tags(), MLFLOW_PARENT_RUN_ID: parent_run_id, **tags})
    client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()])
    return run.info.run_id


def log_child_epoch(run_id: str, metrics: dict) -> None:
    """One synchronous batch per epoch: a few milliseconds, and the run is complete when the trial is."""
    now = int(time.time() * 1000)
    values = [Metric(k, float(v), now, metrics["epoch"]) for k, v in metrics.items() if k != "epoch"]
    MlflowClient().log_batch(run_id, metrics=values)


def run_address(run: mlflow.ActiveRun) -> str:
    """' at <its page in the UI>' when the tracking URI is a server, else nothing."""
    uri = tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return ""
    return f" at {redact_url(uri.rstrip('/'))}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"


def reopen(run_id: str) -> None:
    """Marks an ended run RUNNING again: a study's parent that workers on other machines will finish."""
    MlflowClient().update_run(run_id, status="RUNNING")


def end_child_run(run_id: str, status: str, tags: dict[str, str] | None = None) -> None:
    client = MlflowClient()
    for key, value in (tags or {}).items():
        client.set_tag(run_id, key, str(value)[:5000])
    client.set_terminated(run_id, status)


def run_exists(run_id: str) -> bool:
    try:
        MlflowClient().get_run(run_id)
    except mlflow.exceptions.MlflowException:
        return False
    return True


def log_model_and_finish(run_id: str, model: torch.nn.Module, example_inputs: torch.Tensor, classes: list[str],
                         epoch: int, summary: dict[str, float], val: mlflow.data.Dataset) -> None:
    """log_kept_model into an existing run (from any thread), then ends the run FINISHED either way.

    A model that fails to log leaves a tag, not a FAILED run: the trial itself completed.
    """
    logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)  # its pickle warning, once per trial, is noise
    try:
        with mlflow.start_run(run_id=run_id):
            log_kept_model(model, example_inputs, classes, epoch, summary, val)
    except Exception as err:  # noqa: BLE001 - recorded on the run, which must still end
        MlflowClient().set_tag(run_id, "model_error", error_text(err))
    MlflowClient().set_terminated(run_id, "FINISHED")


def model_id_of(run_id: str) -> str | None:
    """The id of the model a run logged last (models:/<id> loads it), or None if it logged none."""
    return _model_id(MlflowClient().get_run(run_id))


def _model_id(run: Run) -> str | None:
    outputs = run.outputs.model_outputs if run.outputs else []
    return outputs[-1].model_id if outputs else None


def log_params(params: dict) -> None:
    mlflow.log_params(params)


def log_dict(data: dict, artifact_file: str) -> None:
    mlflow.log_dict(data, artifact_file)


def use_tracking_uri(uri: str) -> None:
    mlflow.set_tracking_uri(uri)
    os.environ.pop("MLFLOW_RUN_ID", None)  # a worker must never resume the parent run as its own


def tracking_uri() -> str:
    return mlflow.get_tracking_uri()


# --- evaluation --------------------------------------------------------------------------------

def resolve_model(model_uri: str) -> tuple[str, str, str | None]:
    """(model URI, id of the run that trained it, its LoggedModel id); a bare run id stands for that run's model."""
    if ":" not in model_uri and "/" not in model_uri:
        model_uri = f"runs:/{model_uri}/{MODEL_NAME}"
    try:
        info = mlflow.models.get_model_info(model_uri)
    except Exception as err:  # MLflow raises several kinds (missing run, model, artifact)
        raise ConfigError("model_uri", f"no model at {model_uri!r}: {first_line(err)}") from None
    if not info.run_id:
        raise ConfigError("model_uri", f"{model_uri!r} names no training run, so its data cannot be checked")
    return model_uri, info.run_id, info.model_id


def load_network(model_uri: str) -> torch.nn.Module:
    return mlflow.pytorch.load_model(model_uri)


def run_tags(run_id: str) -> dict[str, str]:
    return MlflowClient().get_run(run_id).data.tags


def log_metrics(metrics: dict[str, float], run_id: str | None = None, model_id: str | None = None,
                dataset: mlflow.data.Dataset | None = None) -> None:
    """Onto the active run, or onto another (finished) run, e.g. test metrics onto the training run.

    With model_id (and the dataset they were computed on) they are that model's metrics too: the
    Models tab and mlflow.search_logged_models show them.
    """
    if run_id is None:
        mlflow.log_metrics(metrics, model_id=model_id, dataset=dataset)
        return
    client = MlflowClient()
    for key, value in metrics.items():
        client.log_metric(run_id, key, value)


def log_csv(frame: pd.DataFrame, artifact_file: str, index: bool = False) -> None:
    mlflow.log_text(frame.to_csv(index=index), artifact_file)


def log_table(frame: pd.DataFrame, artifact_file: str) -> None:
    """A table the MLflow UI shows (and compares across runs) in its Evaluation/artifact views."""
    mlflow.log_table(frame, artifact_file=artifact_file)


# --- registry ----------------------------------------------------------------------------------

CHAMPION = "champion"


def register(model_uri: str, name: str) -> tuple[int, bool]:
    """Registers a version; moves alias champion to it only if its judged_value beats the champion's.

    Returns (version, whether it became champion).
    """
    # MLflow 3 keeps models apart from run artifacts; naming the model itself spares a fallback warning.
    model_id = mlflow.models.get_model_info(model_uri).model_id
    version = mlflow.register_model(f"models:/{model_id}" if model_id else model_uri, name)
    client = MlflowClient()
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:  # no champion yet
        champion = None
    promoted = champion is None or (judged_value(version.model_id, version.run_id)
                                    > judged_value(champion.model_id, champion.run_id))
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, version.version)
    return int(version.version), promoted


def judged_value(model_id: str | None, run_id: str) -> float:
    """What a model is judged by (JUDGED_BY): the val_accuracy its training run linked to it, i.e. that
    of the epoch whose weights it holds. A model logged before metrics were linked to models holds the
    last epoch's weights, so for it (or a run without a model) it is the run's final val_accuracy."""
    client = MlflowClient()
    if model_id:
        linked = [m.value for m in client.get_logged_model(model_id).metrics or []
                  if m.key == JUDGED_BY and m.run_id == run_id]
        if linked:
            return linked[-1]
    return client.get_run(run_id).data.metrics.get(JUDGED_BY, float("-inf"))


# --- comparing and reusing runs -------------------------------------------------------------

LEADERBOARD_COLUMNS = ["run_id", "run_name", "kind", "lr", "batch_size", "epochs", RANKING_METRIC, "test_accuracy",
                       "train_time_s"]
TRIAL_TAG = "optuna.trial_number"


def training_runs(experiment: str, include_trials: bool = False) -> tuple[pd.DataFrame, int]:
    """One row per finished run that trained (has lr and val_accuracy) in the named experiment, and how
    many tuning trials were left out (all are rows with include_trials)."""
    found = mlflow.get_experiment_by_name(experiment)
    if found is None:
        raise ConfigError("experiment", f"no experiment named {experiment!r}")
    client = MlflowClient()
    rows, trials_left_out = [], 0
    for run in client.search_runs([found.experiment_id], filter_string="attributes.status = 'FINISHED'"):
        params, metrics = run.data.params, run.data.metrics
        if "lr" not in params or "val_accuracy" not in metrics:
            continue
        is_trial = TRIAL_TAG in run.data.tags
        if is_trial and not include_trials:
            trials_left_out += 1
            continue
        rows.append({
            "run_id": run.info.run_id,
            "run_name": run.info.run_name,
            "kind": "trial" if is_trial else "train",
            "lr": float(params["lr"]),
            "batch_size": int(params.get("batch_size", 0)),
            "epochs": int(params.get("epochs", 0)),
            RANKING_METRIC: judged_value(_model_id(run), run.info.run_id),
            "test_accuracy": metrics.get("test_accuracy", float("nan")),
            "train_time_s": train_time_s(client, run),
        })
    return pd.DataFrame(rows, columns=LEADERBOARD_COLUMNS), trials_left_out


def _per_epoch(client: MlflowClient, run_id: str, metric: str) -> dict[int, float]:
    # By step: a resumed run may log an epoch its store missed again, from the checkpoint.
    return {m.step: m.value for m in client.get_metric_history(run_id, metric)}


def train_time_s(client: MlflowClient, run: Run) -> float:
    """Seconds spent training: the sum of its epochs' epoch_time_s. A resumed run's wall-clock span would
    count the time it sat interrupted; runs from before epoch_time_s was logged fall back to that span."""
    epochs = _per_epoch(client, run.info.run_id, "epoch_time_s")
    if epochs:
        return round(sum(epochs.values()), 1)
    return round((run.info.end_time - run.info.start_time) / 1000, 1)


STEP_TAG = "cnnexp.step"
CODE_TAG = "cnnexp.code_version"


def find_step_run(step: str, config, code_version: str, data_digest: str) -> Run | None:
    """A finished run of this step with equal params (by value), code version and data digest."""
    experiment_id = mlflow.active_run().info.experiment_id
    query = f"tags.`{STEP_TAG}` = '{step}' and tags.`{CODE_TAG}` = '{code_version}' and attributes.status = 'FINISHED'"
    for run in MlflowClient().search_runs([experiment_id], filter_string=query, order_by=["attributes.start_time DESC"]):
        if run.data.tags.get("data_digest") == data_digest and same_params(run.data.params, config):
            return run
    return None


def same_params(logged: dict[str, str], config) -> bool:
    """Params are logged as strings ("0.01", "1e-2", "100"): compare them as the config's types."""
    cast = {"int": int, "float": float, "bool": lambda text: text.lower() == "true", "str": str}
    for f in dataclasses.fields(config):
        if f.name not in logged:
            return False
        try:
            if cast[str(f.type)](logged[f.name]) != getattr(config, f.name):
                return False
        except ValueError:
            return False
    return True


def latest_child_run_id() -> str:
    """The child the active run started last (mlflow.last_active_run gives the parent while it is active)."""
    parent = mlflow.active_run().info
    (child,) = MlflowClient().search_runs(
        [parent.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.run_id}'",
        order_by=["attributes.start_time DESC"], max_results=1,
    )
    return child.info.run_id


def mark_step(run_id: str, step: str, code_version: str) -> None:
    """Tags a finished step run so a later main can find and reuse it."""
    client = MlflowClient()
    client.set_tag(run_id, STEP_TAG, step)
    client.set_tag(run_id, CODE_TAG, code_version)


def guard_killed_status(run_id: str) -> None:
    """Keeps an interrupted `mlflow run` run KILLED.

    After our script exits, `mlflow run` (3.x, projects._maybe_set_run_terminated) re-marks the run
    FAILED: it compares the status string with RunStatus ints, so it never sees that the run already
    ended. A detached helper waits for that write and puts KILLED back.
    """
    import subprocess
    import sys

    code = "import sys; from cnnexp.tracking import restore_killed; restore_killed(sys.argv[1], int(sys.argv[2]))"
    with contextlib.suppress(OSError):
        subprocess.Popen(
            [sys.executable, "-c", code, run_id, str(os.getppid())], start_new_session=True,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )


def restore_killed(run_id: str, parent_pid: int, grace_s: float = 10.0, limit_s: float = 600.0) -> None:
    import time

    client = MlflowClient()
    started, parent_gone = time.monotonic(), None
    while time.monotonic() - started < limit_s:
        run = client.get_run(run_id)
        if run.info.status == "FAILED" and ERROR_TAG not in run.data.tags:
            client.set_terminated(run_id, "KILLED")
            return
        if parent_gone is None and not _alive(parent_pid):
            parent_gone = time.monotonic()
        if parent_gone is not None and time.monotonic() - parent_gone > grace_s:
            return
        time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --- checkpoints and resuming (pipelines/train.py) --------------------------------------------

ENTRY_POINT_TAG = "entry_point"
RESUMABLE = ("KILLED", "FAILED")
CHECKPOINT_ARTIFACTS = "checkpoint"


def resumable_run(run_id: str, running_ok: bool = False):
    """The train run `resume` names, or ConfigError saying why it cannot be continued.

    running_ok: a run this machine lost its tracking server in, which stays RUNNING there.
    """
    try:
        run = MlflowClient().get_run(run_id)
    except MlflowException:
        raise ConfigError("resume", f"no run {run_id!r} in {mlflow.get_tracking_uri()}") from None
    tags = run.data.tags
    if "train" not in (tags.get(ENTRY_POINT_TAG), tags.get("mlflow.project.entryPoint")):
        raise ConfigError("resume", f"run {run_id} is not a train run")
    if run.info.status not in RESUMABLE + (("RUNNING",) if running_ok else ()):
        raise ConfigError(
            "resume", f"run {run_id} is {run.info.status}; only KILLED or FAILED train runs can be resumed"
        )
    return run


def fetch_checkpoint(run_id: str, into: Path) -> bool:
    """Downloads the checkpoint a run logged when it stopped (for resuming on another machine)."""
    if not any(a.path == CHECKPOINT_ARTIFACTS for a in MlflowClient().list_artifacts(run_id)):
        return False
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory(prefix="cnnexp-ckpt-") as tmp:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=CHECKPOINT_ARTIFACTS, dst_path=tmp)
        shutil.copytree(local, into, dirs_exist_ok=True)
    return True


def log_checkpoint(directory: Path) -> None:
    if directory.is_dir():
        mlflow.log_artifacts(str(directory), CHECKPOINT_ARTIFACTS)


def link_resumed_run(run_id: str, epoch: int) -> None:
    """Under `mlflow run -P resume=X` MLflow has made a new run; it stays as a short record pointing to X."""
    client = MlflowClient()
    client.set_tag(run_id, "resumed_from_epoch", str(epoch))
    pending = os.environ.get("MLFLOW_RUN_ID")
    if pending and pending != run_id:
        resumed = client.get_run(run_id).info.run_name
        client.set_tag(pending, "resumed_into", run_id)
        client.set_tag(pending, "mlflow.runName", f"resume-of-{resumed}")
        client.set_tag(pending, "mlflow.note.content", f"Continued run {run_id} ({resumed}); its metrics and model are there.")


def logged_steps(run_id: str, metric: str) -> set[int]:
    return {m.step for m in MlflowClient().get_metric_history(run_id, metric)}


def redact_url(url: str) -> str:
    """The URL with any password (user:password@ or ?password=) replaced by ***, safe to log or print."""
    from urllib.parse import parse_qsl, urlencode, urlsplit

    parts = urlsplit(url)
    if parts.password is not None:
        user, host = parts.netloc.rsplit("@", 1)
        url = url.replace(parts.netloc, f"{user.split(':', 1)[0]}:***@{host}", 1)
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    secret = ("password", "passwd", "pwd", "secret", "token")
    if any(k.lower() in secret for k, _ in pairs):
        query = urlencode([(k, "***" if k.lower() in secret else v) for k, v in pairs], safe="*")
        url = url.replace(parts.query, query, 1)
    return url
