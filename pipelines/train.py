"""mlflow run . -e train: train the tutorial CNN and track params, per-epoch metrics and the model."""
from __future__ import annotations

import contextlib
import dataclasses
import math
import shutil
import sys
from pathlib import Path

from cnnexp import tracking
from cnnexp.checkpoint import capture, has_checkpoint, load_checkpoint, restore, save_checkpoint
from cnnexp.config import ConfigError, TrainConfig
from cnnexp.data import PreparedData, is_prepared, load_prepared, prepare
from cnnexp.devices import resolve_device
from cnnexp.model import to_inputs
from cnnexp.train import BestEpoch, fit, new_training_state, speed_options
from pipelines.common import make_parser, register_model, run_entry_point
from pipelines.progress import EpochProgress


def load_or_prepare(config: TrainConfig) -> PreparedData:
    if is_prepared(config.data_dir, config.dataset):
        return load_prepared(config.data_dir, config.dataset)
    print(f"{config.dataset} is not prepared in {config.data_dir}; preparing it first")
    return prepare(config.prepare_config())[0]


def find_checkpoint(run_id: str, directory: Path) -> dict:
    """The last checkpoint of a run to resume: the local one, else the one it logged as an artifact."""
    tracking.resumable_run(run_id)
    if not has_checkpoint(directory) and not tracking.fetch_checkpoint(run_id, directory):
        raise ConfigError("resume", f"run {run_id} has no checkpoint (it stopped before its first epoch ended)")
    return load_checkpoint(directory)


def main(config: TrainConfig) -> list[dict]:
    config.validate()
    device = resolve_device(config.device)
    checkpoint = find_checkpoint(config.resume, Path(config.checkpoint_dir, config.resume)) if config.resume else None
    if checkpoint is not None:
        config = config.resumed_with(checkpoint["config"])
    run_args = {"run_id": config.resume} if config.resume else {"run_name": f"train-lr{config.lr:g}-bs{config.batch_size}"}
    # None, not False, when off: MLflow's own MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING still applies.
    with tracking.tracked_run(**run_args, log_system_metrics=config.system_metrics or None) as run:
        run_id = run.info.run_id
        checkpoints = Path(config.checkpoint_dir, run_id)
        tracking.log_config(config)
        tracking.set_tags({tracking.ENTRY_POINT_TAG: "train"})
        data = load_or_prepare(config)
        tracking.log_environment(device, data)
        train, val = data.splits["train"], data.splits["val"]
        progress = EpochProgress(config.epochs, math.ceil(len(train) / config.batch_size))
        state, best = new_training_state(config.lr, config.seed, device), BestEpoch()
        history = resume_into(state, best, checkpoint, run_id, data.digest) if checkpoint is not None else []
        extras = {"config": dataclasses.asdict(config), "data_digest": data.digest}

        def on_epoch_end(metrics: dict) -> None:
            history.append(metrics)
            best.update(metrics["epoch"], metrics["val_accuracy"], state.model)
            # Checkpoint before logging: a kill in between loses no metric, resume logs it from the checkpoint.
            save_checkpoint(checkpoints, capture(state, history=history, best=best.state_dict(), **extras),
                            state.epoch)
            tracking.log_epoch(metrics)
            progress.on_epoch_end(metrics)

        try:
            fit(
                state, train, val, batch_size=config.batch_size, epochs=config.epochs,
                on_epoch_end=on_epoch_end, on_batch_end=progress.batch_callback, **speed_options(config),
            )
        except BaseException:
            # Into the run's artifacts too, so it can be resumed wherever the tracking store is reachable.
            with contextlib.suppress(Exception):  # never hide why training stopped
                tracking.log_checkpoint(checkpoints)
            raise
        tracking.log_learning_curves(history)
        kept = kept_epoch(history, best, config.keep)
        if config.keep == "best":
            best.restore(state.model)
        model = tracking.log_kept_model(state.model, to_inputs(val.images[:4]), data.classes, kept["epoch"],
                                        best.summary(), tracking.split_dataset(data, "val"))
        tracking.flush()
        if config.register:
            register_model(model.model_uri, config.register)
    shutil.rmtree(checkpoints, ignore_errors=True)  # a finished run is not resumed; its model is logged
    print(f"model: {model.model_uri}  epoch {kept['epoch']} ({config.keep}), val_accuracy {kept['val_accuracy']:.4f}")
    return history


def kept_epoch(history: list[dict], best: BestEpoch, keep: str) -> dict:
    """The metrics of the epoch whose weights become the model: the best one, or the last."""
    epoch = best.epoch if keep == "best" else history[-1]["epoch"]
    return next(m for m in history if m["epoch"] == epoch)


def resume_into(state, best: BestEpoch, checkpoint: dict, run_id: str, data_digest: str) -> list[dict]:
    """Restores the checkpoint (best-so-far included); logs epochs it holds that the store missed;
    returns the history so far."""
    if data_digest != checkpoint["data_digest"]:
        raise ConfigError(
            "data_dir", f"the prepared data (digest {data_digest}) is not what run {run_id} trained on "
            f"({checkpoint['data_digest']}); prepare the same data again",
        )
    restore(state, checkpoint)
    best.load_state_dict(checkpoint["best"])
    history = checkpoint["history"]
    logged = tracking.logged_steps(run_id, "train_loss")
    for metrics in history:
        if metrics["epoch"] not in logged:
            tracking.log_epoch(metrics)
    tracking.link_resumed_run(run_id, state.epoch)
    print(f"resuming run {run_id} after epoch {state.epoch}")
    return history


def cli(argv: list[str] | None = None, prog: str = "train") -> int:
    return run_entry_point(make_parser(prog, __doc__, TrainConfig), TrainConfig, main, argv)


if __name__ == "__main__":
    sys.exit(cli())
