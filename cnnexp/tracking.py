"""The one place that talks to MLflow: runs, params, per-epoch metrics, datasets, models, figures."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
from pathlib import Path
from collections.abc import Iterator

import mlflow
import numpy as np
import torch
from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient

from cnnexp.config import ConfigError
from cnnexp.data import PreparedData, file_lock
from cnnexp.plots import learning_curves, samples_per_class

MODEL_NAME = "model"
CODE_PATH = str(Path(__file__).resolve().parent)
ERROR_TAG = "error"


@contextlib.contextmanager
def tracked_run(**kwargs) -> Iterator[mlflow.ActiveRun]:
    """Starts (or, under `mlflow run`, resumes) a run and always ends it with the status that happened."""
    open_store()
    with mlflow.start_run(**kwargs) as run:
        try:
            yield run
        except KeyboardInterrupt:
            _flush_quietly()  # metrics of completed epochs may still sit in the async queue
            mlflow.end_run(RunStatus.to_string(RunStatus.KILLED))
            raise
        except BaseException as err:
            _flush_quietly()
            mark_failed(run.info.run_id, err)
            raise


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


def _flush_quietly() -> None:
    with contextlib.suppress(Exception):
        mlflow.flush_async_logging()


def mark_failed(run_id: str, err: BaseException) -> None:
    client = MlflowClient()
    client.set_tag(run_id, ERROR_TAG, f"{type(err).__name__}: {err}"[:5000])
    client.set_terminated(run_id, "FAILED")


def end_pending_run(status: str, err: BaseException | None = None, run_id: str | None = None) -> None:
    """Ends the run `mlflow run` created for us if our code never got to end it (e.g. bad parameters)."""
    run_id = run_id or os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return
    client = MlflowClient()
    with contextlib.suppress(Exception):  # the store itself may be what failed
        if client.get_run(run_id).info.status == "RUNNING":
            if err is not None:
                client.set_tag(run_id, ERROR_TAG, f"{type(err).__name__}: {err}"[:5000])
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


def log_prepared_data(data: PreparedData) -> None:
    dataset = data.manifest["inputs"]["dataset"]
    for name, split in data.splits.items():
        entry = data.manifest["splits"][name]
        ds = mlflow.data.from_numpy(
            features=split.images.numpy(),
            targets=split.labels.numpy(),
            source=str(data.path / entry["file"]),
            name=f"{dataset}-{name}",
            digest=entry["sha256"][:16],
        )
        mlflow.log_input(ds, context=name)
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
    mlflow.set_tag("data_digest", data.digest)


def log_figure(fig, artifact_file: str) -> None:
    import matplotlib.pyplot as plt

    mlflow.log_figure(fig, artifact_file)
    plt.close(fig)


def log_learning_curves(history: list[dict]) -> None:
    log_figure(learning_curves(history), "learning_curves.png")


def log_model(model: torch.nn.Module, example_inputs: torch.Tensor) -> str:
    """Logs the network; returns its URI.

    Pickled rather than torch.export'ed: an exported program loads as a GraphModule that refuses
    .eval() and .train(), while users of mlflow.pytorch.load_model expect the nn.Module they logged.
    code_paths ships cnnexp inside the model so it loads where cnnexp is not installed.
    """
    model = model.cpu().eval()
    example = example_inputs[:4].cpu().numpy()
    with torch.inference_mode():
        signature = infer_signature(example, model(torch.from_numpy(example)).numpy())
    info = mlflow.pytorch.log_model(
        model, name=MODEL_NAME, signature=signature, input_example=example,
        serialization_format="pickle", code_paths=[CODE_PATH],
    )
    return info.model_uri


def set_tags(tags: dict[str, str]) -> None:
    mlflow.set_tags(tags)


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


def resumable_run(run_id: str):
    """The train run `resume` names, or ConfigError saying why it cannot be continued."""
    try:
        run = MlflowClient().get_run(run_id)
    except MlflowException:
        raise ConfigError("resume", f"no run {run_id!r} in {mlflow.get_tracking_uri()}") from None
    tags = run.data.tags
    if "train" not in (tags.get(ENTRY_POINT_TAG), tags.get("mlflow.project.entryPoint")):
        raise ConfigError("resume", f"run {run_id} is not a train run")
    if run.info.status not in RESUMABLE:
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
