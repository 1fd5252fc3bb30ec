"""mlflow run . -e train: train the tutorial CNN and track params, per-epoch metrics and the model."""
from __future__ import annotations

import math
import sys

from cnnexp import tracking
from cnnexp.config import TrainConfig
from cnnexp.data import PreparedData, is_prepared, load_prepared, prepare
from cnnexp.devices import resolve_device
from cnnexp.model import to_inputs
from cnnexp.train import fit, new_training_state
from pipelines.common import make_parser, register_model, run_entry_point
from pipelines.progress import EpochProgress


def load_or_prepare(config: TrainConfig) -> PreparedData:
    if is_prepared(config.data_dir, config.dataset):
        return load_prepared(config.data_dir, config.dataset)
    print(f"{config.dataset} is not prepared in {config.data_dir}; preparing it first")
    return prepare(config.prepare_config())[0]


def main(config: TrainConfig) -> list[dict]:
    config.validate()
    device = resolve_device(config.device)
    run_name = f"train-lr{config.lr:g}-bs{config.batch_size}"
    # None, not False, when off: MLflow's own MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING still applies.
    with tracking.tracked_run(run_name=run_name, log_system_metrics=config.system_metrics or None):
        tracking.log_config(config)
        data = load_or_prepare(config)
        tracking.log_environment(device, data)
        train, val = data.splits["train"], data.splits["val"]
        progress = EpochProgress(config.epochs, math.ceil(len(train) / config.batch_size))

        def on_epoch_end(metrics: dict) -> None:
            tracking.log_epoch(metrics)
            progress.on_epoch_end(metrics)

        state = new_training_state(config.lr, config.seed, device)
        history = fit(
            state, train, val, batch_size=config.batch_size, epochs=config.epochs,
            on_epoch_end=on_epoch_end, on_batch_end=progress.batch_callback,
        )
        tracking.log_learning_curves(history)
        model_uri = tracking.log_model(state.model, to_inputs(val.images[:4]), data.classes)
        tracking.flush()
        if config.register:
            register_model(model_uri, config.register)
    print(f"model: {model_uri}  final val_accuracy {history[-1]['val_accuracy']:.4f}")
    return history


def cli(argv: list[str] | None = None, prog: str = "train") -> int:
    return run_entry_point(make_parser(prog, __doc__, TrainConfig), TrainConfig, main, argv)


if __name__ == "__main__":
    sys.exit(cli())
