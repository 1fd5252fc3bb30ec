"""mlflow run . -e evaluate: score a trained model on the test (or val) split and record why it errs."""
from __future__ import annotations

import sys

import pandas as pd
import torch

from cnnexp import plots
from cnnexp.evaluate import confident_mistakes, confusion_matrix, per_class_metrics, predict, score
from cnnexp.config import EvaluateConfig
from cnnexp.data import DataError, PreparedData, load_prepared
from cnnexp.devices import resolve_device
from cnnexp.model import to_inputs
from cnnexp.tracking import log, tags
from cnnexp.tracking.models import load_network, resolve_model
from cnnexp.tracking.runs import epoch_history, run_tags, set_tags, tracked_run
from pipelines import cli as commands
from pipelines.outcomes import register_model
from pipelines.running import Made

MISTAKES_SHOWN = 24


def load_checked_data(config: EvaluateConfig, training_run_id: str, data: PreparedData | None = None) -> PreparedData:
    """The prepared data (loaded, unless given), refused unless it is the very data the model was trained against."""
    data = data or load_prepared(config.data_dir, config.dataset)
    trained_on = run_tags(training_run_id).get(tags.DATA_DIGEST)
    if trained_on is None:
        raise DataError(f"training run {training_run_id} records no data_digest, so its test data cannot be checked")
    if trained_on != data.digest:
        raise DataError(
            f"data digest mismatch: the model's training run {training_run_id} used data {trained_on}, "
            f"but {data.path} holds {data.digest}; scoring it could mean testing on training images"
        )
    return data


def report(logits: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> dict:
    """Every number and table of an evaluation, all from the same logits."""
    confusion = confusion_matrix(logits, labels, len(classes))
    per_class = pd.DataFrame({"class": classes, **per_class_metrics(confusion)})
    probabilities = logits.softmax(dim=1)
    predictions = pd.DataFrame({
        "label": labels.numpy(),
        "predicted": logits.argmax(dim=1).numpy(),
        "confidence": probabilities.max(dim=1).values.numpy(),
    })
    return {
        "scores": score(logits, labels),
        "confusion": pd.DataFrame(confusion.numpy(), index=classes, columns=classes),
        "per_class": per_class,
        "predictions": predictions,
        "mistakes": confident_mistakes(logits, labels, MISTAKES_SHOWN),
    }


def log_report(result: dict, images: torch.Tensor, classes: list[str]) -> None:
    log.log_table(result["per_class"], "per_class_metrics.json")
    log.log_csv(result["per_class"], "per_class_metrics.csv")
    log.log_csv(result["confusion"].rename_axis("true \\ predicted"), "confusion_matrix.csv", index=True)
    log.log_figure(plots.confusion_matrix(torch.tensor(result["confusion"].to_numpy()), classes),
                        "confusion_matrix.png")
    log.log_csv(result["predictions"].rename_axis("index"), "predictions.csv", index=True)
    mistakes = result["mistakes"]
    rows = result["predictions"].iloc[mistakes.numpy()]
    log.log_figure(
        plots.misclassified_grid(
            images[mistakes], [classes[i] for i in rows["label"]], [classes[i] for i in rows["predicted"]],
            rows["confidence"].tolist(),
        ),
        "misclassified.png",
    )


def main(config: EvaluateConfig, data: PreparedData | None = None) -> Made[dict[str, float]]:
    """Scores the model on a split; returns the evaluation run's id and its metrics. `data`: already loaded."""
    config.validate()
    model_uri, training_run_id, model_id = resolve_model(config.model_uri)
    data = load_checked_data(config, training_run_id, data)  # refused before the run starts, as bad input
    with tracked_run(run_name=f"evaluate-{training_run_id[:8]}-{config.split}") as run:
        log.log_config(config)
        set_tags({tags.SCORED_RUN_ID: training_run_id, tags.SCORED_MODEL_URI: model_uri, **log.data_tags(data)})
        device = resolve_device(config.device)
        split = data.splits[config.split]
        logits = predict(load_network(model_uri).to(device), to_inputs(split.images).to(device)).cpu()
        result = report(logits, split.labels, data.classes)
        metrics = {f"{config.split}_{name}": value for name, value in result["scores"].items()}
        # Linked to the scored model and the split, so the model's record holds its test score.
        log.log_metrics(metrics, model_id=model_id, dataset=log.split_dataset(data, config.split))
        log_report(result, split.images, data.classes)
        # The model's training beside how it scores, and on its training run as the test metrics are: train
        # itself leaves the curves to the metrics the MLflow UI charts (matplotlib costs every train 0.6 s).
        if history := epoch_history(training_run_id):
            log.log_figure(plots.learning_curves(history), "learning_curves.png", also_on=training_run_id)
        if config.split == "test":  # val_* on the training run already holds its per-epoch history
            log.log_metrics(metrics, run_id=training_run_id)
        if config.register:
            register_model(model_uri, config.register)
    print("  ".join(f"{name} {value:.4f}" for name, value in metrics.items()) + f"  (model {model_uri})")
    return Made(run.info.run_id, metrics)


def cli(argv: list[str] | None = None, prog: str = "evaluate") -> int:
    return commands.run("evaluate", argv, prog)


if __name__ == "__main__":
    sys.exit(cli())
