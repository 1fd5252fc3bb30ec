"""Prediction (logits) kept apart from scoring, so every score comes from the same logits."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

EVAL_BATCH_SIZE = 2000


@torch.inference_mode()
def predict(model: nn.Module, inputs: torch.Tensor, batch_size: int = EVAL_BATCH_SIZE) -> torch.Tensor:
    """Logits for float inputs [N, 1, 28, 28] already on the model's device."""
    was_training = model.training
    model.eval()
    logits = torch.cat([model(inputs[i : i + batch_size]) for i in range(0, len(inputs), batch_size)])
    model.train(was_training)
    return logits


def score(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    return {
        "loss": F.cross_entropy(logits, labels).item(),
        "accuracy": (logits.argmax(dim=1) == labels).float().mean().item(),
    }


def confusion_matrix(logits: torch.Tensor, labels: torch.Tensor, num_classes: int = 10) -> torch.Tensor:
    """Rows are true classes, columns predicted ones."""
    predicted = logits.argmax(dim=1)
    return torch.bincount(labels * num_classes + predicted, minlength=num_classes**2).reshape(num_classes, num_classes)


def per_class_metrics(confusion: torch.Tensor) -> dict[str, list[float]]:
    """Precision, recall, F1 and support per class; 0 where a class is never predicted or present."""
    confusion = confusion.to(torch.float64)
    true_pos = confusion.diagonal()
    predicted = confusion.sum(dim=0)
    actual = confusion.sum(dim=1)
    precision = torch.where(predicted > 0, true_pos / predicted.clamp(min=1), 0.0)
    recall = torch.where(actual > 0, true_pos / actual.clamp(min=1), 0.0)
    denom = precision + recall
    f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp(min=1e-12), 0.0)
    return {
        "precision": precision.tolist(),
        "recall": recall.tolist(),
        "f1": f1.tolist(),
        "support": actual.to(torch.int64).tolist(),
    }


def confident_mistakes(logits: torch.Tensor, labels: torch.Tensor, k: int = 16) -> torch.Tensor:
    """Indices of up to k misclassified examples, most confident (highest predicted probability) first."""
    confidence, predicted = logits.softmax(dim=1).max(dim=1)
    wrong = torch.nonzero(predicted != labels).flatten()
    order = confidence[wrong].argsort(descending=True)
    return wrong[order[:k]]
