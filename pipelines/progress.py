"""What people see while work runs: a bar over batches on a terminal, one plain line per epoch always."""
from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from tqdm import tqdm

if TYPE_CHECKING:  # torch stays unimported until training starts, so --help is quick
    import torch


def interactive() -> bool:
    return sys.stderr.isatty()


def calm_bars_off_terminal() -> None:
    """Off a terminal, third-party tqdm bars (torchvision's download) redraw at most every 10 s.

    Redrawn ten times a second, a bar becomes one endless line in a CI log; tqdm reads
    TQDM_MININTERVAL on each new bar, so this reaches bars we do not create. A user's own setting wins.
    """
    if not interactive():
        os.environ.setdefault("TQDM_MININTERVAL", "10")


class EpochProgress:
    """on_batch_end / on_epoch_end callbacks for fit; the bar exists only on a terminal."""

    def __init__(self, epochs: int, batches_per_epoch: int, batch_size: int, print_line: Callable[[str], None] = print):
        self.epochs = epochs
        self.batches, self.batch_size = batches_per_epoch, batch_size
        self.print_line = print_line
        self.bar: tqdm | None = None
        self.epoch = 1
        self.reading: tuple[torch.Tensor, int, object] | None = None  # (loss sum on its way to the host, images, done)

    def on_batch_end(self, batch: int, loss_sums: torch.Tensor) -> None:
        """loss_sums: the epoch's running sum of the loss, on the device (one row: fit's one member)."""
        if self.bar is None:
            desc = f"epoch {self.epoch}/{self.epochs}"
            self.bar = tqdm(total=self.batches, desc=desc, leave=False, unit="batch", dynamic_ncols=True)
            self.reading = None
        self.bar.update(1)
        if batch % 20 == 0:
            self._show_running_loss(loss_sums, (batch + 1) * self.batch_size)

    def _show_running_loss(self, loss_sums: torch.Tensor, images: int) -> None:
        """On a GPU, shows the last reading once it has arrived and starts the next: the bar never waits on
        the device. On the CPU there is nothing to wait for."""
        if loss_sums.device.type != "cuda":
            self.bar.set_postfix(loss=f"{float(loss_sums[0]) / images:.4f}")
            return
        if self.reading is not None and self.reading[2].query():
            total, seen, _ = self.reading
            self.bar.set_postfix(loss=f"{float(total[0]) / seen:.4f}")
        import torch  # already loaded by the training that calls this; not at import, for a quick --help

        done = torch.cuda.Event()
        copy = loss_sums.to("cpu", non_blocking=True)
        done.record()
        self.reading = (copy, images, done)

    def on_epoch_end(self, m: dict) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.epoch = m["epoch"] + 1
        self.print_line(
            f"epoch {m['epoch']:>3}/{self.epochs}  loss {m['train_loss']:.4f}  acc {m['train_accuracy']:.4f}  "
            f"val_loss {m['val_loss']:.4f}  val_acc {m['val_accuracy']:.4f}  {m['epoch_time_s']:.2f}s"
        )

    @property
    def batch_callback(self):
        return self.on_batch_end if interactive() else None
