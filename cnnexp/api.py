"""The Python API: each command as a function with the command's parameters and defaults (its config dataclass,
the one source of both), returning what a notebook wants instead of an exit code.

    import cnnexp
    trained = cnnexp.train(epochs=2, dataset="fashion-mnist-sample")
    trained.model_uri  # runs:/<run_id>/model

Each prints what its command prints (quiet=True prints nothing) and raises where the command would exit
non-zero: ConfigError or DataError for bad input, anything else for a failure while working. Everything
heavy (torch, MLflow, Optuna) is imported when a function is called, not when cnnexp is imported.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from cnnexp.config import CompareConfig, EvaluateConfig, ExportConfig, PrepareConfig, TrainConfig, TuneConfig

if TYPE_CHECKING:
    import optuna
    import pandas as pd

    from cnnexp.data import PreparedData
    from cnnexp.onnx_export import Agreement

R = TypeVar("R")


@dataclass(frozen=True)
class Prepared:
    run_id: str
    path: str  # the prepared splits' directory
    digest: str
    data: PreparedData = field(repr=False)  # the splits as tensors


@dataclass(frozen=True)
class Trained:
    run_id: str
    model_uri: str  # runs:/<run_id>/model: loads in mlflow.pyfunc, mlflow.pytorch, serve and evaluate
    metrics: dict[str, float]  # the run's, as its page shows them: last epoch's, best_val_accuracy, best_epoch
    history: list[dict] = field(repr=False)  # one dict of metrics per epoch


@dataclass(frozen=True)
class Evaluated:
    run_id: str
    model_uri: str
    metrics: dict[str, float]


@dataclass(frozen=True)
class Tuned:
    run_id: str  # the study's parent run; each trial is a child run of it
    best_params: dict | None  # {"lr", "batch_size"}; None while no trial is complete
    summary: dict  # trial counts, best_value, best_trial (what summary.json on the parent run holds)
    study: optuna.Study = field(repr=False)


@dataclass(frozen=True)
class Exported:
    path: str
    model_uri: str
    agreement: Agreement  # with the model's pyfunc on real images


def _with_config(config_class: type, command: str) -> Callable[[Callable[[Any], R]], Callable[..., R]]:
    """Turns run(config) into a function of the config's fields as keyword arguments (plus quiet), whose
    signature and help list them with the command's defaults and help texts."""
    fields = dataclasses.fields(config_class)
    names = [f.name for f in fields]

    def wrap(run: Callable[[Any], R]) -> Callable[..., R]:
        @functools.wraps(run)
        def call(*, quiet: bool = False, **params: Any) -> R:
            if unknown := sorted(set(params) - set(names)):
                raise TypeError(f"{command}() got unknown parameter {unknown[0]!r}; its parameters: {', '.join(names)}")
            with _output(quiet):
                _as_the_command_does()
                return run(config_class(**params))

        keyword = inspect.Parameter.KEYWORD_ONLY
        call.__signature__ = inspect.Signature(
            [inspect.Parameter(f.name, keyword, default=f.default, annotation=f.type) for f in fields]
            + [inspect.Parameter("quiet", keyword, default=False, annotation="bool")],
            return_annotation=inspect.signature(run).return_annotation,
        )
        lines = [f"    {f.name}={f.default!r}: {f.metadata.get('help', '')}" for f in fields]
        call.__doc__ = (f"{run.__doc__}\n\nParameters, as `cnnexp {command} --help` lists them:\n" + "\n".join(lines)
                        + "\n    quiet=False: print nothing (the command's lines, progress bars, warnings)")
        return call

    return wrap


@contextlib.contextmanager
def _output(quiet: bool) -> Iterator[None]:
    if not quiet:
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def _as_the_command_does() -> None:
    """What every command sets up before its work: MLflow's own log lines off, bounded HTTP waits, and a
    tracking server that does not answer refused at once."""
    from cnnexp.tracking import store
    from pipelines.progress import calm_bars_off_terminal

    calm_bars_off_terminal()
    store.quiet_mlflow()
    store.bound_http_waits()
    store.check_store()


@_with_config(PrepareConfig, "prepare")
def prepare(config: PrepareConfig) -> Prepared:
    """Reads, checks and splits a dataset, recorded as an MLflow run; an identical preparation is reused."""
    from pipelines import prepare as command

    made = command.main(config)
    return Prepared(made.run_id, str(made.result.path), made.result.digest, made.result)


@_with_config(TrainConfig, "train")
def train(config: TrainConfig) -> Trained:
    """Trains the CNN as one MLflow run (preparing the data first if needed); its model is runs:/<run_id>/model."""
    from cnnexp.tracking.models import MODEL_NAME
    from pipelines import train as command

    made = command.main(config)
    return Trained(made.run_id, f"runs:/{made.run_id}/{MODEL_NAME}", _run_metrics(made.run_id), made.result)


@_with_config(EvaluateConfig, "evaluate")
def evaluate(config: EvaluateConfig) -> Evaluated:
    """Scores a logged model (any model URI, or a training run id) on a split, as an MLflow run."""
    from pipelines import evaluate as command

    made = command.main(config)
    return Evaluated(made.run_id, config.model_uri, made.result)


@_with_config(TuneConfig, "tune")
def tune(config: TuneConfig) -> Tuned:
    """Runs (or extends) an Optuna study of lr and batch size; the study is a parent run, each trial a child."""
    import optuna

    from cnnexp.tuning.study import open_storage
    from pipelines import tune as command

    made = command.main(config)
    study = optuna.load_study(study_name=config.study_name, storage=open_storage(config.storage))
    return Tuned(made.run_id, best_params(study) if made.result.get("trials_complete") else None, made.result, study)


@_with_config(CompareConfig, "compare")
def compare(config: CompareConfig) -> pd.DataFrame:
    """The leaderboard of an experiment's finished training runs, best first, as a DataFrame."""
    from pipelines import compare as command

    return command.main(config)


@_with_config(ExportConfig, "export")
def export(config: ExportConfig) -> Exported:
    """Writes a logged model as ONNX (float32 [N, 1, 28, 28] in 0-1 -> logits), checked against its pyfunc."""
    from pipelines import export as command

    made = command.main(config)
    return Exported(made.result["path"], made.result["model_uri"], made.result["agreement"])


def best_params(study: optuna.Study) -> dict:
    """A study's best trial as {"lr": ..., "batch_size": ...}. Optuna's own study.best_params holds the
    exponent it searched, log2_batch_size, not the size. Raises ValueError while no trial is complete."""
    from cnnexp.tuning import space

    return space.best_params(study)


def _run_metrics(run_id: str) -> dict[str, float]:
    from mlflow.tracking import MlflowClient

    return dict(MlflowClient().get_run(run_id).data.metrics)
