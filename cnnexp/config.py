"""The single source of every default: the CLI, MLproject and README follow these dataclasses."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace

DATASETS = ("fashion-mnist", "mnist", "kmnist")


class ConfigError(ValueError):
    """A parameter a user gave is not allowed; the message names the parameter."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param


def _help(text: str, **kwargs) -> dict:
    return {"help": text, **kwargs}


@dataclass(frozen=True)
class PrepareConfig:
    dataset: str = field(default="fashion-mnist", metadata=_help("dataset to prepare", choices=DATASETS))
    source: str = field(
        default="",
        metadata=_help("directory holding the four IDX files (gzipped or not); empty downloads with torchvision"),
    )
    data_dir: str = field(default="data", metadata=_help("where prepared splits are written"))
    val_fraction: float = field(default=0.1, metadata=_help("fraction of the training files held out for validation"))
    seed: int = field(default=0, metadata=_help("seed of the stratified train/validation split"))

    def validate(self) -> None:
        _check_choice("dataset", self.dataset, DATASETS)
        _check_nonempty("data_dir", self.data_dir)
        if not (0.0 < self.val_fraction < 1.0):
            raise ConfigError("val_fraction", f"must be between 0 and 1 (exclusive), got {self.val_fraction}")
        _check_seed(self.seed)


@dataclass(frozen=True)
class TrainConfig:
    lr: float = field(default=0.01, metadata=_help("Adam learning rate"))
    batch_size: int = field(default=100, metadata=_help("images per optimiser step"))
    epochs: int = field(default=10, metadata=_help("passes over the training split"))
    seed: int = field(default=0, metadata=_help("seed of weight init and per-epoch shuffling"))
    device: str = field(default="auto", metadata=_help("auto picks CUDA, then MPS, then CPU; or cpu, cuda, cuda:N, mps"))
    data_dir: str = field(default="data", metadata=_help("directory of prepared data"))
    dataset: str = field(default="fashion-mnist", metadata=_help("dataset to train on", choices=DATASETS))
    source: str = field(
        default="",
        metadata=_help("IDX directory used if the data is not prepared yet; empty downloads"),
    )
    resume: str = field(
        default="",
        metadata=_help("run id of a KILLED or FAILED train run to continue from its last checkpoint"),
    )
    checkpoint_dir: str = field(
        default="checkpoints",
        metadata=_help("where an unfinished run keeps its last completed epoch, as <checkpoint_dir>/<run_id>/"),
    )

    def validate(self) -> None:
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError("lr", f"must be a positive number, got {self.lr}")
        if self.batch_size < 1:
            raise ConfigError("batch_size", f"must be at least 1, got {self.batch_size}")
        if self.epochs < 1:
            raise ConfigError("epochs", f"must be at least 1, got {self.epochs}")
        _check_seed(self.seed)
        _check_device(self.device)
        _check_choice("dataset", self.dataset, DATASETS)
        _check_nonempty("data_dir", self.data_dir)
        _check_nonempty("checkpoint_dir", self.checkpoint_dir)
        # The id names a checkpoint directory, so it must not be able to climb out of it.
        if self.resume and not re.fullmatch(r"[A-Za-z0-9][\w-]{0,255}", self.resume):
            raise ConfigError("resume", f"{self.resume!r} is not a run id (letters, digits, _ and -)")

    def prepare_config(self) -> PrepareConfig:
        return PrepareConfig(dataset=self.dataset, source=self.source, data_dir=self.data_dir)

    def resumed_with(self, saved: dict) -> TrainConfig:
        """This config with the interrupted run's own settings for everything that shapes its result.

        A value given here that is neither the default nor the run's is refused: params are
        immutable, so the resumed run could not record it. device and paths may change.
        """
        defaults = TrainConfig()
        for name in RESUME_KEEPS:
            given, kept = getattr(self, name), saved[name]
            if given != getattr(defaults, name) and given != kept:
                raise ConfigError(
                    name, f"run {self.resume} was trained with {kept!r}, got {given!r}; "
                    f"resume continues with the run's own {name} (leave it out or pass {kept!r})",
                )
        return replace(self, **{name: saved[name] for name in RESUME_KEEPS})


RESUME_KEEPS = ("lr", "batch_size", "epochs", "seed", "dataset")


def _check_choice(param: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(param, f"unknown value {value!r}; allowed: {', '.join(allowed)}")


def _check_device(device: str) -> None:
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", device):
        raise ConfigError("device", f"unknown device {device!r}; allowed: auto, cpu, cuda, cuda:N, mps")


def _check_nonempty(param: str, value: str) -> None:
    if not value.strip():
        raise ConfigError(param, "must not be empty")


def _check_seed(seed: int) -> None:
    if not (0 <= seed < 2**32):
        raise ConfigError("seed", f"must be between 0 and 2**32 - 1, got {seed}")
