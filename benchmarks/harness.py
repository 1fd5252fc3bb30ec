"""What the benchmarks share: the data they run on, the Bench they are given, and running contenders
side by side (interleaved) with their medians and ratios. Imported plainly by run.py, study.py and
tuning_benchmarks.py."""
from __future__ import annotations

import statistics
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cnnexp.data import SAMPLE_DIR, DataError, Split, read_source
from cnnexp.train import fit, new_training_state

DEFAULT_SOURCE = SAMPLE_DIR  # the real 4,443-image sample shipped in the package
LR, SEED = 0.01, 0


@dataclass
class Bench:
    """Everything a benchmark needs: data, device and how many repeats."""

    train: Split
    val: Split
    test: Split
    data_kind: str
    device: torch.device
    repeats: int
    quick: bool
    tutorial_root: Path = field(default=Path())


def load_data(source: Path, n_train: int, n_test: int) -> tuple[Split, Split, Split, str]:
    """Real images tiled up to n_train/n_test when the sample exists, class-structured noise otherwise."""
    try:
        splits, _ = read_source("fashion-mnist", source)
        images = torch.cat([splits["train"].images, splits["test"].images])
        labels = torch.cat([splits["train"].labels, splits["test"].labels])
        kind = f"real Fashion-MNIST ({len(labels):,} images from {source}) tiled to {n_train:,} train / {n_test:,} test"
    except (DataError, FileNotFoundError, OSError):
        images, labels = synthetic(n_train, seed=1)
        kind = f"synthetic ({source} not found): {n_train:,} train / {n_test:,} test"
    train = tile(images, labels, n_train)
    test = tile(images.flip(0), labels.flip(0), n_test)  # another order than train's
    val = Split(test.images[:1000], test.labels[:1000])
    return train, val, test, kind


def synthetic(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A bright bar whose row encodes the class, over noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    images = torch.randint(0, 60, (n, 28, 28), generator=g, dtype=torch.uint8)
    rows = 2 + 2 * labels
    for offset in range(3):
        images[torch.arange(n), rows + offset, 4:24] = 230
    return images, labels


def tile(images: torch.Tensor, labels: torch.Tensor, n: int) -> Split:
    reps = -(-n // len(labels))
    return Split(images.repeat(reps, 1, 1)[:n].contiguous(), labels.repeat(reps)[:n].contiguous())


def write_torchvision_root(root: Path, train: Split, test: Split) -> Path:
    """The IDX files torchvision's FashionMNIST reads, so the tutorial contender uses its real dataset class."""
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, split in (("train", train), ("t10k", test)):
        n = len(split.labels)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">iiii", 2051, n, 28, 28) + split.images.numpy().tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">ii", 2049, n) + split.labels.to(torch.uint8).numpy().tobytes())
    return root


def fit_epochs(b: Bench, batch_size: int, epochs: int = 1, on_epoch_end=None) -> dict:
    """The whole fit call, input conversion and validation included: what a user waits for."""
    state = new_training_state(LR, SEED, b.device)
    started = time.perf_counter()
    _, history = fit(state, b.train, b.val, batch_size=batch_size, epochs=epochs, on_epoch_end=on_epoch_end)
    return {"seconds": (time.perf_counter() - started) / epochs, "train_loss": history[0]["train_loss"]}


def interleave(contenders: dict[str, Callable[[], dict]], repeats: int, warm_up: bool = False) -> dict[str, list[dict]]:
    """Runs A B C A B C ...; with warm_up, a first round is discarded (allocator, oneDNN kernel caches:
    milliseconds, which matter only to short contenders)."""
    for run in contenders.values() if warm_up else ():
        run()
    results: dict[str, list[dict]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, run in contenders.items():
            results[name].append(run())
    return results


def summarise(results: dict[str, list[dict]], baseline: str, key: str = "seconds", higher_is_better: bool = False) -> list[dict]:
    base = statistics.median(r[key] for r in results[baseline])
    rows = []
    for name, runs in results.items():
        values = [r[key] for r in runs]
        median = statistics.median(values)
        rows.append({
            "contender": name, "median": median, "min": min(values), "max": max(values), "n": len(values),
            "ratio_vs_baseline": (median / base) if higher_is_better else (base / median), "baseline": baseline,
        })
    return rows
