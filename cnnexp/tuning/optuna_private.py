"""The one place that leans on Optuna internals (written against Optuna 5.0.0).

tests/unit/tuning/test_optuna_private.py fails loudly when any of these moves.
"""
from __future__ import annotations

import optuna
from optuna.trial import FrozenTrial


def record_heartbeat(study: optuna.Study, trial: optuna.Trial) -> None:
    """A heartbeat for a trial asked with study.ask(). Optuna beats only inside study.optimize; its storage
    (study._storage) and the trial's storage id (trial._trial_id) have no public accessor."""
    study._storage.record_heartbeat(trial._trial_id)


def hand_over_user_attrs(trial: FrozenTrial, **replace: object) -> None:
    """Edits a stale trial's user attrs before RetryHeartbeatStaleTrialCallback copies them into the retry:
    the callback offers no hook, so its input (a FrozenTrial, copied from the storage) is edited in place.
    A value of None removes the attr."""
    for key, value in replace.items():
        if value is None:
            trial.user_attrs.pop(key, None)
        else:
            trial.user_attrs[key] = value
