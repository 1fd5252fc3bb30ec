"""What people see while training: a bar with the running loss on a terminal, plain lines in a log."""
import io
import os
import re

import pytest
import torch

from cnnexp.data import Split
from cnnexp.train import fit, new_training_state
from helpers import synthetic_split
from pipelines import progress
from pipelines.progress import EpochProgress


def _split(n: int, seed: int) -> Split:
    images, labels = synthetic_split(n, seed)
    return Split(torch.from_numpy(images), torch.from_numpy(labels).long())


def _train_with_progress(epochs: int = 2) -> list[str]:
    lines: list[str] = []
    bar = EpochProgress(epochs, batches_per_epoch=4, batch_size=50, print_line=lines.append)
    state = new_training_state(0.01, 0, torch.device("cpu"))
    fit(state, _split(200, 1), _split(50, 2), batch_size=50, epochs=epochs,
        on_epoch_end=lambda metrics, _: bar.on_epoch_end(metrics), on_batch_end=bar.batch_callback)
    return lines


EPOCH_LINE = r"epoch +{n}/2  loss \d\.\d{{4}}  acc \d\.\d{{4}}  val_loss \d\.\d{{4}}  val_acc \d\.\d{{4}}  \d+\.\d\ds"


def test_off_a_terminal_each_epoch_is_one_plain_line_and_no_bar(monkeypatch, capsys):
    monkeypatch.setattr(progress, "interactive", lambda: False)
    lines = _train_with_progress()
    assert [bool(re.fullmatch(EPOCH_LINE.format(n=n), line)) for n, line in zip((1, 2), lines)] == [True, True]
    assert len(lines) == 2
    assert capsys.readouterr().err == ""  # no bar, no carriage returns in a log


def test_on_a_terminal_a_bar_shows_batches_and_the_running_loss(monkeypatch, capsys):
    monkeypatch.setattr(progress, "interactive", lambda: True)
    # Redraw on every batch: with tqdm's default 0.1 s a fast epoch may never draw 4/4.
    monkeypatch.setenv("TQDM_MININTERVAL", "0")
    lines = _train_with_progress()
    bar = capsys.readouterr().err
    assert "epoch 1/2" in bar and "epoch 2/2" in bar
    assert re.search(r"\d/4 \[", bar) and re.search(r"loss=\d\.\d{4}", bar)
    assert len(lines) == 2 and lines[1].startswith("epoch   2/2")


@pytest.mark.parametrize("is_terminal, expected", [(False, "10"), (True, None)])
def test_download_bars_redraw_rarely_off_a_terminal(is_terminal, expected, monkeypatch):
    monkeypatch.setattr(progress, "interactive", lambda: is_terminal)
    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    progress.calm_bars_off_terminal()
    assert os.environ.get("TQDM_MININTERVAL") == expected


def test_a_calmed_download_bar_draws_start_and_end_only(monkeypatch):
    # torchvision downloads through torch's tqdm; this is the bar it draws, fed 200 chunks quickly.
    from torch.utils.model_zoo import tqdm

    monkeypatch.setenv("TQDM_MININTERVAL", "10")
    log = io.StringIO()
    with tqdm(total=200 * 32768, unit="B", unit_scale=True, file=log) as bar:
        for _ in range(200):
            bar.update(32768)
    frames = [f for f in log.getvalue().split("\r") if f.strip()]
    assert len(frames) <= 3 and "100%" in frames[-1]
