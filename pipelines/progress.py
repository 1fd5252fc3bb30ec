"""What people see while work runs: a bar over batches on a terminal, one plain line per epoch always."""
from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from tqdm import tqdm


def interactive() -> bool:
    return sys.stderr.isatty()


class EpochProgress:
    """on_batch_end / on_epoch_end callbacks for fit; the bar exists only on a terminal."""

    def __init__(self, epochs: int, batches_per_epoch: int, print_line: Callable[[str], None] = print):
        self.epochs = epochs
        self.batches = batches_per_epoch
        self.print_line = print_line
        self.bar: tqdm | None = None

    def on_batch_end(self, batch: int, loss: torch.Tensor) -> None:
        if self.bar is None:
            self.bar = tqdm(total=self.batches, leave=False, unit="batch", dynamic_ncols=True)
        self.bar.update(1)
        if batch % 20 == 0:  # reading the loss syncs the device; a few times a second is plenty
            self.bar.set_postfix(loss=f"{loss.item():.4f}")

    def on_epoch_end(self, m: dict) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.print_line(
            f"epoch {m['epoch']:>3}/{self.epochs}  loss {m['train_loss']:.4f}  acc {m['train_accuracy']:.4f}  "
            f"val_loss {m['val_loss']:.4f}  val_acc {m['val_accuracy']:.4f}  {m['epoch_time_s']:.2f}s"
        )

    @property
    def batch_callback(self):
        return self.on_batch_end if interactive() else None
