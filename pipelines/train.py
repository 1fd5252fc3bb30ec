"""mlflow run . -e train: train the tutorial CNN and track params, per-epoch metrics and the model."""
from __future__ import annotations

import contextlib
import dataclasses
import math
import shutil
import sys
from pathlib import Path

import torch

from cnnexp.checkpoint import capture, has_checkpoint, load_checkpoint, restore, save_checkpoint
from cnnexp.errors import write_failure
from cnnexp.config import ConfigError, TrainConfig
from cnnexp.data import PreparedData, naming_held
from cnnexp.devices import resolve_device
from cnnexp.model import Network, to_inputs
from cnnexp.tracking import log, models, owners, resume, store, tags
from cnnexp.tracking.runs import full_run_id, run_address, tracked_run
from cnnexp.train import BestEpoch, TrainingState, fit, new_training_state, speed_options
from pipelines import cli as commands
from pipelines.outcomes import register_model
from pipelines.prepared import load_or_prepare
from pipelines.running import Interrupted, Made
from pipelines.progress import EpochProgress


def find_checkpoint(run_id: str, directory: Path, take_over: bool) -> dict:
    """The last checkpoint of a run to resume: the local one, else the one it logged as an artifact."""
    resume.resumable_run(run_id, store_lost=(directory / STORE_LOST).is_file(), take_over=take_over)
    if not has_checkpoint(directory) and not resume.fetch_checkpoint(run_id, directory):
        raise ConfigError("resume", f"run {run_id} has no checkpoint (it stopped before its first epoch ended)")
    return load_checkpoint(directory)


def main(config: TrainConfig, data: PreparedData | None = None) -> Made[list[dict]]:
    """Trains and logs one run; returns its run id and per-epoch history. `data`: already loaded by the caller."""
    config.validate()
    if config.resume:  # a unique prefix, as lines and the UI show ids, names the run
        config = dataclasses.replace(config, resume=full_run_id("resume", config.resume))
    device = resolve_device(config.device)
    checkpoint = (find_checkpoint(config.resume, Path(config.checkpoint_dir, config.resume), config.take_over)
                  if config.resume else None)
    if checkpoint is not None:
        config = config.resumed_with(checkpoint["config"])
    # Data that is missing or mistyped is refused before the run starts: no FAILED run is left for bad input.
    data = data or load_or_prepare(config)
    config = naming_held(config, data)  # params and the model's params name the sample where it stood in
    run_args = {"run_id": config.resume} if config.resume else {"run_name": f"train-lr{config.lr:g}-bs{config.batch_size}"}
    # None, not False, when off: MLflow's own MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING still applies.
    # The entry point goes in with the run itself (tracked_run adds its owner): what `cnnexp orphans` looks for.
    with tracked_run(**run_args, tags={tags.ENTRY_POINT: "train"}, log_system_metrics=config.system_metrics or None) as run:
        run_id = run.info.run_id
        checkpoints = Path(config.checkpoint_dir, run_id)
        log.log_config(config)
        log.log_environment(device, data)
        train, val = data.splits["train"], data.splits["val"]
        if config.batch_size > len(train):
            print(f"batch_size {config.batch_size} is more than the {len(train)} training images: "
                  f"each epoch is a single batch of {len(train)}")
        progress = EpochProgress(config.epochs, math.ceil(len(train) / config.batch_size), config.batch_size)
        best = BestEpoch()
        state, history = (resume_into(best, checkpoint, run_id, data.digest, device) if checkpoint is not None
                          else (new_training_state(config.lr, config.seed, device), []))
        extras = {"config": dataclasses.asdict(config), "data_digest": data.digest}

        def on_epoch_end(metrics: dict, trained: TrainingState) -> None:
            history.append(metrics)
            best.update(metrics["epoch"], metrics["val_accuracy"], trained)
            # Checkpoint before logging: a kill in between loses no metric, resume logs it from the checkpoint.
            try:
                save_checkpoint(checkpoints, capture(trained, history=history, best=best.state_dict(), **extras),
                                trained.epoch)
            except (OSError, RuntimeError) as err:  # a full disk: the previous epoch's checkpoint is still whole
                if (reason := write_failure(err)) is None:
                    raise
                raise unwritable_checkpoint(reason, checkpoints, run_id, trained.epoch) from None
            log.log_epoch(metrics)
            owners.beat()
            progress.on_epoch_end(metrics)

        try:
            state, _ = fit(
                state, train, val, batch_size=config.batch_size, epochs=config.epochs,
                on_epoch_end=on_epoch_end, on_batch_end=progress.batch_callback, **speed_options(config),
            )
        except BaseException as stop:
            # Into the run's artifacts too, so it can be resumed wherever the tracking store is reachable.
            with contextlib.suppress(Exception):  # never hide why training stopped
                resume.log_checkpoint(checkpoints)
            if isinstance(stop, KeyboardInterrupt) and not isinstance(stop, Interrupted):
                raise Interrupted(interrupted_line(run_id, checkpoints, epochs_done(history))) from None
            raise
        try:
            model, kept = log_results(state, best, history, data, config.keep)
        except Exception as err:
            if (reason := write_failure(err)) is not None:
                raise RuntimeError(f"cannot write the model ({reason}); {checkpoints} keeps all {state.epoch} "
                                   f"epochs: free space, then `cnnexp train --resume {run_id}` logs it") from None
            raise store_lost_error(err, checkpoints, run_id, state.epoch) from None
        if config.register:
            register_model(model.model_uri, config.register)
        if config.resume:
            resume.clear_stale_error(run_id)
    shutil.rmtree(checkpoints, ignore_errors=True)  # a finished run is not resumed; its model is logged
    print(f"run {run_id}{run_address(run)}")
    print(f"model: runs:/{run_id}/{models.MODEL_NAME} ({model.model_uri})  epoch {kept['epoch']} ({config.keep}), "
          f"val_accuracy {kept['val_accuracy']:.4f}")
    return Made(run_id, history)


def log_results(state: TrainingState, best: BestEpoch, history: list[dict], data: PreparedData, keep: str):
    """The kept epoch's model; returns the ModelInfo and that epoch's metrics. (The learning curves are the
    run's per-epoch metrics, which the MLflow UI charts; `cnnexp evaluate` draws them with its figures.)"""
    kept = kept_epoch(history, best, keep)
    network = best.restore(Network(num_classes=len(data.classes))) if keep == "best" else state.network()
    model = models.log_kept_model(network, to_inputs(data.splits["val"].images[:4]), data.classes, kept["epoch"],
                                  best.summary(), log.split_dataset(data, "val"))
    log.flush()
    return model, kept


def epochs_done(history: list[dict]) -> int:
    """The last epoch completed (history holds every epoch of the run, resumed ones included)."""
    return history[-1]["epoch"] if history else 0


def kept_epoch(history: list[dict], best: BestEpoch, keep: str) -> dict:
    """The metrics of the epoch whose weights become the model: the best one, or the last."""
    epoch = best.epoch if keep == "best" else epochs_done(history)
    return next(m for m in history if m["epoch"] == epoch)


def interrupted_line(run_id: str, checkpoints: Path, epoch: int) -> str:
    """What a stopped run says: its id, what is kept, and the command that goes on."""
    if not has_checkpoint(checkpoints):
        return f"the run is marked KILLED (run {run_id}, before its first epoch ended: nothing to resume)"
    return f"the run is marked KILLED (run {run_id}, after epoch {epoch}); `cnnexp train --resume {run_id}` goes on"


def unwritable_checkpoint(reason: str, checkpoints: Path, run_id: str, epoch: int) -> RuntimeError:
    """One line for a checkpoint that cannot be written (a full disk): what is kept, and how to go on."""
    kept = (f"epochs 1-{epoch - 1} are kept: free space (or choose another checkpoint_dir), then "
            f"`cnnexp train --resume {run_id}`" if epoch > 1 else "nothing was kept yet: free space and train again")
    return RuntimeError(f"checkpoint_dir: cannot write epoch {epoch}'s checkpoint in {checkpoints} "
                        f"({reason}); {kept}")


STORE_LOST = "store-lost.txt"  # in a run's checkpoint directory: the run may be resumed though still RUNNING


def store_lost_error(err: Exception, checkpoints: Path, run_id: str, epoch: int) -> Exception:
    """err, or (when the tracking server has stopped answering) one line: what is missing, how to get it in.

    Training has finished by then; its checkpoint stays, marked so that `resume` accepts the run even
    though the server could not be told that it stopped.
    """
    problem = store.store_problem()
    if problem is None:
        return err
    checkpoints.mkdir(parents=True, exist_ok=True)
    (checkpoints / STORE_LOST).write_text(f"{problem}\n")
    return RuntimeError(
        f"MLFLOW_TRACKING_URI: the tracking server {store.redact_url(store.tracking_uri())} stopped answering "
        f"({problem}); not logged: the model and any epoch metrics the server missed. "
        f"{checkpoints} keeps all {epoch} epochs: once the server answers, `cnnexp train --resume {run_id}` logs them"
    )


def resume_into(best: BestEpoch, checkpoint: dict, run_id: str, data_digest: str,
                device: torch.device) -> tuple[TrainingState, list[dict]]:
    """Restores the checkpoint (best-so-far included); logs epochs it holds that the store missed;
    returns the training state and the history so far."""
    if data_digest != checkpoint["data_digest"]:
        raise ConfigError(
            "data_dir", f"the prepared data (digest {data_digest}) is not what run {run_id} trained on "
            f"({checkpoint['data_digest']}); prepare the same data again",
        )
    state = restore(checkpoint, device)
    best.load_state_dict(checkpoint["best"])
    history = checkpoint["history"]
    logged = resume.logged_steps(run_id, "train_loss")
    for metrics in history:
        if metrics["epoch"] not in logged:
            log.log_epoch(metrics)
    resume.link_resumed_run(run_id, state.epoch)
    print(f"resuming run {run_id} after epoch {state.epoch}")
    return state, history


def cli(argv: list[str] | None = None, prog: str = "train") -> int:
    return commands.run("train", argv, prog)


if __name__ == "__main__":
    sys.exit(cli())
