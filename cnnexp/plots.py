"""Figures people would rather look at than read. Each returns a matplotlib Figure; callers save or log it."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # headless: figures are files, never windows
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def samples_per_class(images: torch.Tensor, labels: torch.Tensor, classes: list[str], per_class: int = 8) -> Figure:
    fig, axes = plt.subplots(len(classes), per_class, figsize=(per_class * 0.9, len(classes) * 0.95))
    for cls, row in enumerate(axes):
        members = torch.nonzero(labels == cls).flatten()[:per_class]
        for col, ax in enumerate(row):
            ax.axis("off")
            if col < len(members):
                ax.imshow(images[members[col]].numpy(), cmap="gray_r", vmin=0, vmax=255)
        row[0].text(-4, 14, classes[cls], ha="right", va="center", fontsize=8)
    fig.suptitle("Samples per class (training split)")
    fig.subplots_adjust(left=0.2, wspace=0.05, hspace=0.05)
    return fig


def learning_curves(history: list[dict]) -> Figure:
    epochs = [m["epoch"] for m in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for split in ("train", "val"):
        loss_ax.plot(epochs, [m[f"{split}_loss"] for m in history], marker="o", label=split)
        acc_ax.plot(epochs, [m[f"{split}_accuracy"] for m in history], marker="o", label=split)
    loss_ax.set(title="Cross-entropy loss", xlabel="epoch", ylabel="loss")
    acc_ax.set(title="Accuracy", xlabel="epoch", ylabel="accuracy")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Learning curves: train vs validation")
    fig.tight_layout()
    return fig
