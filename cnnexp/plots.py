"""Figures people would rather look at than read. Each returns a matplotlib Figure; callers save or log it."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # headless: figures are files, never windows
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def samples_per_class(images: torch.Tensor, labels: torch.Tensor, classes: list[str], per_class: int = 8) -> Figure:
    """Up to `per_class` images of each class, a row per class, drawn as one tiled image: a subplot per
    image (80 of them) took 1.7 s of every prepare."""
    size, gap = images.shape[-1], 2
    pitch = size + gap
    grid = torch.zeros(len(classes) * pitch - gap, per_class * pitch - gap, dtype=torch.uint8)  # 0: white in gray_r
    for cls in range(len(classes)):
        for col, index in enumerate(torch.nonzero(labels == cls).flatten()[:per_class].tolist()):
            grid[cls * pitch:cls * pitch + size, col * pitch:col * pitch + size] = images[index]
    fig, ax = plt.subplots(figsize=(per_class * 0.9, len(classes) * 0.95))
    ax.imshow(grid.numpy(), cmap="gray_r", vmin=0, vmax=255)
    ax.set_xticks([])
    ax.set_yticks([cls * pitch + size / 2 for cls in range(len(classes))], classes, fontsize=8)
    ax.tick_params(length=0)
    ax.spines[:].set_visible(False)
    ax.set_title("Samples per class (training split)")
    fig.tight_layout()
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
        integer_ticks(ax)
    fig.suptitle("Learning curves: train vs validation")
    fig.tight_layout()
    return fig


def confusion_matrix(confusion: torch.Tensor, classes: list[str]) -> Figure:
    """Counts with class names on both axes; rows are true classes, columns predicted ones."""
    n = len(classes)
    fig, ax = plt.subplots(figsize=(8, 7))
    ax.imshow(confusion.numpy(), cmap="Blues")
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set(xlabel="predicted", ylabel="true", title="Confusion matrix")
    threshold = confusion.max().item() / 2
    for i in range(n):
        for j in range(n):
            value = confusion[i, j].item()
            ax.text(j, i, str(value), ha="center", va="center", fontsize=7, color="white" if value > threshold else "black")
    fig.tight_layout()
    return fig


def misclassified_grid(images: torch.Tensor, true: list[str], predicted: list[str], confidence: list[float],
                       columns: int = 8) -> Figure:
    rows = max(1, -(-len(images) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 1.6, rows * 1.9), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < len(images):
            ax.imshow(images[i].numpy(), cmap="gray_r", vmin=0, vmax=255)
            ax.set_title(f"true {true[i]}\npred {predicted[i]} {confidence[i]:.2f}", fontsize=7)
    fig.suptitle("Most confidently misclassified")
    fig.tight_layout()
    return fig


def accuracy_vs_lr(lr: list[float], accuracy: list[float], batch_size: list[int], dataset: list[str]) -> Figure:
    """One panel per dataset, titled with its name (an accuracy on one dataset is no measure on another, as
    compare ranks them); one colour per batch size (a handful of discrete values: a legend, not a colour bar)."""
    names = sorted(set(dataset))
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        rows = [i for i, d in enumerate(dataset) if d == name]
        for size in sorted({batch_size[i] for i in rows}):
            chosen = [i for i in rows if batch_size[i] == size]
            ax.scatter([lr[i] for i in chosen], [accuracy[i] for i in chosen], label=f"batch_size {size}")
        ax.legend()
        ax.set_xscale("log")
        ax.set(xlabel="learning rate", ylabel="val_accuracy of the logged model",
               title=f"{name or 'unknown dataset'}: validation accuracy vs learning rate")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def integer_ticks(ax) -> None:
    """Ticks only at whole numbers on the x axis: there is no epoch (or trial) 1.25."""
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def fit_labels(fig: Figure) -> None:
    """Moves the axes in so that tick labels and titles stay inside the figure (Optuna's bar chart of
    importances cut "batch_size" to "patch_size" at the left edge)."""
    fig.tight_layout()


def save(fig: Figure, path) -> None:
    fig.savefig(path, dpi=120)
    plt.close(fig)


def close(fig: Figure) -> None:
    """Frees a figure pyplot still holds once it is saved or logged."""
    plt.close(fig)
