"""The single source of every default: the CLI, MLproject and README follow these dataclasses."""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field

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
    register: str = field(
        default="", metadata=_help("registered model name; empty skips registration (alias champion follows val_accuracy)")
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

    def prepare_config(self) -> PrepareConfig:
        return PrepareConfig(dataset=self.dataset, source=self.source, data_dir=self.data_dir)


SPLITS_TO_SCORE = ("test", "val")


@dataclass(frozen=True)
class EvaluateConfig:
    model_uri: str = field(
        default="", metadata=_help("runs:/<run_id>/model, models:/<name>/<version>, models:/<model_id> or a training run id")
    )
    data_dir: str = field(default="data", metadata=_help("directory of prepared data"))
    dataset: str = field(default="fashion-mnist", metadata=_help("dataset to score on", choices=DATASETS))
    split: str = field(default="test", metadata=_help("split to score", choices=SPLITS_TO_SCORE))
    device: str = field(default="auto", metadata=_help("auto picks CUDA, then MPS, then CPU; or cpu, cuda, cuda:N, mps"))
    register: str = field(
        default="", metadata=_help("registered model name; empty skips registration (alias champion follows val_accuracy)")
    )

    def validate(self) -> None:
        _check_nonempty("model_uri", self.model_uri)
        _check_nonempty("data_dir", self.data_dir)
        _check_choice("dataset", self.dataset, DATASETS)
        _check_choice("split", self.split, SPLITS_TO_SCORE)
        _check_device(self.device)


def _like(config_class: type, name: str):
    """The same field (default, help) as another config's, so main cannot drift from its steps."""
    original = config_class.__dataclass_fields__[name]
    return field(default=original.default, metadata=original.metadata)


@dataclass(frozen=True)
class MainConfig:
    """prepare -> train -> evaluate; each field goes to the steps that take it."""

    dataset: str = _like(PrepareConfig, "dataset")
    source: str = _like(PrepareConfig, "source")
    data_dir: str = _like(PrepareConfig, "data_dir")
    val_fraction: float = _like(PrepareConfig, "val_fraction")
    seed: int = _like(PrepareConfig, "seed")
    lr: float = _like(TrainConfig, "lr")
    batch_size: int = _like(TrainConfig, "batch_size")
    epochs: int = _like(TrainConfig, "epochs")
    device: str = _like(TrainConfig, "device")

    def steps(self) -> tuple[PrepareConfig, TrainConfig]:
        """The step configs; evaluate's needs the model URI, known only after training."""
        values = dataclasses.asdict(self)
        return tuple(
            step(**{f.name: values[f.name] for f in dataclasses.fields(step) if f.name in values})
            for step in (PrepareConfig, TrainConfig)
        )

    def validate(self) -> None:
        for step in self.steps():
            step.validate()


@dataclass(frozen=True)
class CompareConfig:
    experiment: str = field(default="Default", metadata=_help("name of the experiment whose training runs are ranked"))
    sort_by: str = field(default="best_val_accuracy", metadata=_help("leaderboard column to rank by, best first"))
    output: str = field(default="leaderboard.csv", metadata=_help("where the leaderboard CSV is written"))
    plot: bool = field(default=False, metadata=_help("also save val_accuracy vs lr, coloured by batch_size, as PNG"))

    def validate(self) -> None:
        _check_nonempty("experiment", self.experiment)
        _check_nonempty("output", self.output)


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
