"""The search space: lr on a log scale, and batch size a power of two searched through its exponent.

Optuna records `log2_batch_size` (an int), so samplers and optuna-dashboard's plots see an ordered quantity
(16 < 32 < ... < 1024); as a categorical, TPE learnt nothing from the order and the plots put 1024 first.
cnnexp itself reads `batch_size`: suggest() and params_of() give it, queued retries are translated back.
"""
from __future__ import annotations

import optuna
from optuna.trial import FrozenTrial

from cnnexp.config import TuneConfig

LOG2_BATCH = "log2_batch_size"
# How studies created before the exponent search batch size. They keep it: a resumed study whose trials
# mixed the two parameters would have the sampler learn from neither history.
CATEGORICAL_BATCH = "batch_size"


def search_space(config: TuneConfig) -> dict:
    return {"lr": {"low": config.lr_min, "high": config.lr_max, "log": True}, "batch_size": config.batch_sizes}


def searches_categorical(study: optuna.Study) -> bool:
    """The study already has trials with a categorical batch_size (made before the exponent)."""
    return any(CATEGORICAL_BATCH in t.distributions for t in study.get_trials(deepcopy=False))


def suggest(trial: optuna.Trial, config: TuneConfig) -> dict:
    """The trial's point as cnnexp reads it: {"lr", "batch_size"}."""
    lr = trial.suggest_float("lr", config.lr_min, config.lr_max, log=True)
    if searches_categorical(trial.study):
        return {"lr": lr, "batch_size": trial.suggest_categorical(CATEGORICAL_BATCH, config.batch_sizes)}
    exponents = [size.bit_length() - 1 for size in config.batch_sizes]
    batch_size = 2 ** trial.suggest_int(LOG2_BATCH, exponents[0], exponents[-1])
    trial.set_user_attr("batch_size", batch_size)  # the size itself, in the dashboard's trials table
    return {"lr": lr, "batch_size": batch_size}


def params_of(trial: FrozenTrial) -> dict:
    """A trial's Optuna params as cnnexp reads them (batch_size, whichever way the study searched it)."""
    params = dict(trial.params)
    if LOG2_BATCH in params:
        params["batch_size"] = 2 ** params.pop(LOG2_BATCH)
    return params


def best_params(study: optuna.Study) -> dict:
    """The best trial's point as {"lr": ..., "batch_size": ...}: Optuna's study.best_params holds the
    searched exponent, log2_batch_size, not the size. Raises ValueError while no trial is complete."""
    return params_of(study.best_trial)


def optuna_params(study: optuna.Study, params: dict) -> dict:
    """The inverse of params_of for this study: what enqueue_trial must fix so that suggest() repeats the point."""
    if "batch_size" not in params or searches_categorical(study):
        return dict(params)
    fixed = {k: v for k, v in params.items() if k != "batch_size"}
    fixed[LOG2_BATCH] = int(params["batch_size"]).bit_length() - 1
    return fixed


def optuna_names(study: optuna.Study) -> list[str]:
    """The study's Optuna names for lr and batch size, as its figures must name them."""
    return ["lr", CATEGORICAL_BATCH if searches_categorical(study) else LOG2_BATCH]
