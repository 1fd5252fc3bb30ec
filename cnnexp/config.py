"""The single source of every default: the CLI, MLproject and README follow these dataclasses."""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field, replace

from cnnexp.checks import (ConfigError, check_choice, check_cohort, check_device, check_directory, check_nonempty,
                           check_positive, check_seed, check_timeout, check_writable_dir)
from cnnexp.ranking import RANKING_METRIC
# fashion-mnist-sample: 4,443 real Fashion-MNIST images shipped inside the package (cnnexp/sample_data),
# so the main job runs offline too; prepare falls back to it when the fashion-mnist download fails.
DATASETS = ("fashion-mnist", "mnist", "kmnist", "fashion-mnist-sample")
KEEPS = ("best", "last")


def _help(text: str, **kwargs) -> dict:
    return {"help": text, **kwargs}


@dataclass(frozen=True)
class PrepareConfig:
    dataset: str = field(default="fashion-mnist", metadata=_help("dataset to prepare", choices=DATASETS))
    source: str = field(
        default="",
        metadata=_help("directory holding the four IDX files (gzipped or not); empty downloads with torchvision "
                       "(fashion-mnist falls back to the bundled sample offline)"),
    )
    data_dir: str = field(default="data", metadata=_help("where prepared splits are written"))
    val_fraction: float = field(default=0.1, metadata=_help("fraction of the training files held out for validation"))
    seed: int = field(default=0, metadata=_help("seed of the stratified train/validation split"))

    def validate(self) -> None:
        check_choice("dataset", self.dataset, DATASETS)
        check_directory("data_dir", self.data_dir)
        if not (0.0 < self.val_fraction < 1.0):
            raise ConfigError("val_fraction", f"must be between 0 and 1 (exclusive), got {self.val_fraction}")
        check_seed(self.seed)


@dataclass(frozen=True)
class TrainConfig:
    lr: float = field(default=0.01, metadata=_help("Adam learning rate"))
    batch_size: int = field(default=100, metadata=_help("images per optimiser step"))
    epochs: int = field(default=10, metadata=_help("passes over the training split"))
    keep: str = field(default="best", metadata=_help(
        "which epoch's weights are logged as the model: best (highest val_accuracy) or last", choices=KEEPS))
    seed: int = field(default=0, metadata=_help("seed of weight init and per-epoch shuffling"))
    device: str = field(default="auto", metadata=_help("auto picks CUDA, then MPS, then CPU; or cpu, cuda, cuda:N, mps"))
    data_dir: str = field(default="data", metadata=_help("directory of prepared data"))
    dataset: str = field(default="fashion-mnist", metadata=_help("dataset to train on", choices=DATASETS))
    source: str = field(
        default="",
        metadata=_help("IDX directory used if the data is not prepared yet or the bundled sample stands in; empty downloads"),
    )
    register: str = field(
        default="", metadata=_help("registered model name; empty skips registration (alias champion follows the model's val_accuracy)")
    )
    bf16: bool = field(default=False, metadata=_help("bfloat16 autocast of forward and loss (for recent GPUs; no faster on CPU)"))
    torch_compile: bool = field(
        default=False, metadata=_help("torch.compile the training step (compiles once per run: for long GPU runs; 2x slower on CPU)")
    )
    system_metrics: bool = field(
        default=False,
        metadata=_help("log CPU, memory, disk, network (and NVIDIA GPU) metrics with MLflow's system-metrics monitor"),
    )
    resume: str = field(default="", metadata=_help(
        "run id of a train run to continue from its last checkpoint: KILLED, FAILED, or RUNNING with its process gone"))
    take_over: bool = field(default=False, metadata=_help(
        "resume a RUNNING run whose process on another host has sent no heartbeat for a while (you know it is gone)"))
    checkpoint_dir: str = field(
        default="checkpoints",
        metadata=_help("where an unfinished run keeps its last completed epoch, as <checkpoint_dir>/<run_id>/"),
    )

    def validate(self) -> None:
        check_positive("lr", self.lr)
        if self.batch_size < 1:
            raise ConfigError("batch_size", f"must be at least 1, got {self.batch_size}")
        if self.epochs < 1:
            raise ConfigError("epochs", f"must be at least 1, got {self.epochs}")
        check_choice("keep", self.keep, KEEPS)
        check_seed(self.seed)
        check_device(self.device)
        check_choice("dataset", self.dataset, DATASETS)
        check_directory("data_dir", self.data_dir)
        check_directory("checkpoint_dir", self.checkpoint_dir)
        # Here, not at the first checkpoint, after an epoch's work.
        check_writable_dir("checkpoint_dir", self.checkpoint_dir)
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


RESUME_KEEPS = ("lr", "batch_size", "epochs", "keep", "seed", "dataset")


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
        default="", metadata=_help("registered model name; empty skips registration (alias champion follows the model's val_accuracy)")
    )

    def validate(self) -> None:
        check_nonempty("model_uri", self.model_uri)
        check_directory("data_dir", self.data_dir)
        check_choice("dataset", self.dataset, DATASETS)
        check_choice("split", self.split, SPLITS_TO_SCORE)
        check_device(self.device)


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
    sort_by: str = field(default=RANKING_METRIC, metadata=_help(
        "leaderboard column to rank by, best first (model_val_accuracy: the logged model's own, as the champion rule)"))
    include_trials: bool = field(default=False, metadata=_help("rank tuning trials' runs too, among the training runs"))
    output: str = field(default="", metadata=_help("CSV file to write the leaderboard to; empty writes no file"))
    plot: bool = field(default=False, metadata=_help("also save val_accuracy vs lr, coloured by batch_size, as PNG beside the CSV"))

    def validate(self) -> None:
        check_nonempty("experiment", self.experiment)
        if self.plot and not self.output.strip():
            raise ConfigError("plot", "needs output: the figure is saved beside the CSV (same name, .png)")


SAMPLERS = ("tpe", "tpe-multivariate", "random", "gp")
# Trials one process trains together when `cohort` is 0, by device type (benchmarks/README.md: cohort).
DEFAULT_COHORT = {"cpu": 8, "cuda": 32}
PRUNERS = ("asha", "median", "hyperband", "none")
OBJECTIVES = ("best", "last")  # which epoch's val_accuracy is a trial's value


@dataclass(frozen=True)
class TuneConfig:
    n_trials: int = field(default=20, metadata=_help("new trials this call runs (a resumed study keeps its old ones)"))
    timeout: float = field(default=0.0, metadata=_help("stop starting new trials after this many seconds; 0 = no limit"))
    epochs: int = field(default=5, metadata=_help("epochs per trial"))
    lr_min: float = field(default=1e-4, metadata=_help("smallest learning rate (sampled log-uniform)"))
    lr_max: float = field(default=0.1, metadata=_help("largest learning rate"))
    batch_min: int = field(default=16, metadata=_help("smallest batch size (a power of two)"))
    batch_max: int = field(default=1024, metadata=_help("largest batch size (a power of two)"))
    sampler: str = field(default="tpe", metadata=_help(
        "Optuna sampler (tpe-multivariate: TPE modelling lr and batch size jointly)", choices=SAMPLERS))
    pruner: str = field(default="asha", metadata=_help(
        "Optuna pruner: asha (successive halving: a third go on after epochs 1, 3, 9, ...), median, hyperband or none",
        choices=PRUNERS))
    objective: str = field(default="best", metadata=_help(
        "a trial's value: its best epoch's val_accuracy (that of its logged model) or its last epoch's", choices=OBJECTIVES))
    storage: str = field(
        default="optuna-journal.log",
        metadata=_help("Optuna journal file, or any Optuna storage URL (sqlite:///..., postgresql://...)"),
    )
    study_name: str = field(default="cnnexp-tune", metadata=_help("study to create or resume"))
    workers: int = field(default=1, metadata=_help("parallel worker processes sharing the study; 0 = only create or extend the study for `cnnexp worker`s"))
    cohort: int = field(default=0, metadata=_help(
        f"trials one process trains together as one fused model; 0 picks {DEFAULT_COHORT['cpu']} on CPU, "
        f"{DEFAULT_COHORT['cuda']} on CUDA; 1 trains them one by one"))
    device: str = field(default="auto", metadata=_help("auto, cpu, cuda, cuda:N or mps; with several GPUs each worker takes one"))
    seed: int = field(default=0, metadata=_help("weight-init and shuffling seed of every trial; sampler seed base"))
    data_dir: str = field(default="data", metadata=_help("directory of prepared data"))
    dataset: str = field(default="fashion-mnist", metadata=_help("dataset to tune on", choices=DATASETS))
    source: str = field(default="", metadata=_help("IDX directory used if the data is not prepared yet or the bundled sample stands in; empty downloads"))
    retrain_best: bool = field(default=False, metadata=_help("train the best configuration again, log it and score it on test"))
    bf16: bool = _like(TrainConfig, "bf16")
    torch_compile: bool = _like(TrainConfig, "torch_compile")

    def validate(self) -> None:
        if self.n_trials < 1 and not (self.n_trials == 0 and self.retrain_best):
            raise ConfigError("n_trials", f"must be at least 1 (or 0 with retrain_best true, to retrain an existing "
                                          f"study's best), got {self.n_trials}")
        check_timeout(self.timeout)
        if self.epochs < 1:
            raise ConfigError("epochs", f"must be at least 1, got {self.epochs}")
        for name in ("lr_min", "lr_max"):
            check_positive(name, getattr(self, name))
        if self.lr_min >= self.lr_max:
            raise ConfigError("lr_min", f"must be below lr_max ({self.lr_max}), got {self.lr_min}")
        for name in ("batch_min", "batch_max"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ConfigError(name, f"must be a power of two (1, 2, 4, ...), got {value}")
        if self.batch_min > self.batch_max:
            raise ConfigError("batch_min", f"must not exceed batch_max ({self.batch_max}), got {self.batch_min}")
        check_choice("sampler", self.sampler, SAMPLERS)
        check_choice("pruner", self.pruner, PRUNERS)
        check_choice("objective", self.objective, OBJECTIVES)
        check_nonempty("storage", self.storage)
        check_nonempty("study_name", self.study_name)
        if self.workers < 0:
            raise ConfigError("workers", f"must be 0 (run no trials here) or more, got {self.workers}")
        check_cohort(self.cohort)
        check_device(self.device)
        check_seed(self.seed)
        check_choice("dataset", self.dataset, DATASETS)
        check_directory("data_dir", self.data_dir)

    @property
    def batch_sizes(self) -> list[int]:
        return [2**k for k in range(self.batch_min.bit_length() - 1, self.batch_max.bit_length())]

    def prepare_config(self) -> PrepareConfig:
        return PrepareConfig(dataset=self.dataset, source=self.source, data_dir=self.data_dir)


@dataclass(frozen=True)
class WorkerConfig:
    """Joins a study that `tune` created: the search space, epochs, seed and dataset come from the study."""

    storage: str = field(default="optuna-journal.log", metadata=_help("the study's Optuna storage (journal file or URL)"))
    study_name: str = field(default="cnnexp-tune", metadata=_help("study to join (created by `cnnexp tune`)"))
    n_trials: int = field(default=0, metadata=_help("trials this call runs; 0 = until the study has the trial count its `tune` set"))
    timeout: float = field(default=0.0, metadata=_help("stop starting new trials after this many seconds; 0 = no limit"))
    workers: int = field(default=1, metadata=_help("parallel worker processes on this machine"))
    cohort: int = _like(TuneConfig, "cohort")
    device: str = field(default="auto", metadata=_help("auto, cpu, cuda, cuda:N or mps; with several GPUs each worker takes one"))
    data_dir: str = field(default="data", metadata=_help("directory of prepared data"))
    source: str = field(default="", metadata=_help("IDX directory used if the data is not prepared yet or the bundled sample stands in; empty downloads"))

    def validate(self) -> None:
        check_nonempty("storage", self.storage)
        check_nonempty("study_name", self.study_name)
        if self.n_trials < 0:
            raise ConfigError("n_trials", f"must be 0 (until the study's trial count) or more, got {self.n_trials}")
        check_timeout(self.timeout)
        if self.workers < 1:
            raise ConfigError("workers", f"must be at least 1, got {self.workers}")
        check_cohort(self.cohort)
        check_device(self.device)
        check_directory("data_dir", self.data_dir)


@dataclass(frozen=True)
class ExportConfig:
    model_uri: str = _like(EvaluateConfig, "model_uri")
    output: str = field(default="model.onnx", metadata=_help(
        "ONNX file to write: input float32 [N, 1, 28, 28] in 0-1 (pixels / 255), output logits [N, classes]"))
    check_images: int = field(default=100, metadata=_help(
        "real images (the bundled Fashion-MNIST test split) on which the export must agree with the model's pyfunc"))

    def validate(self) -> None:
        check_nonempty("model_uri", self.model_uri)
        check_nonempty("output", self.output)
        if not 1 <= self.check_images <= CHECKABLE_IMAGES:
            raise ConfigError("check_images", f"must be from 1 to {CHECKABLE_IMAGES}, got {self.check_images}")


CHECKABLE_IMAGES = 1_000  # the bundled sample's test split


@dataclass(frozen=True)
class OrphansConfig:
    end: bool = field(default=False, metadata=_help(
        "mark the orphaned runs FAILED (tag error says why), so the UI no longer shows them running; "
        "a train run stays resumable from its checkpoint"))

    def validate(self) -> None:
        """A bool has no wrong value; there for the entry points' common shape."""
