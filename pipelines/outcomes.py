"""What a command does once its work is done, and says in one line: a model registered (train, evaluate),
a trial finished (tune and its workers)."""
from __future__ import annotations


def register_model(model_uri: str, name: str) -> None:
    """`register=<name>` of train and evaluate: a new version; champion only if it validates better."""
    from cnnexp.tracking.registry import CHAMPION, register_and_promote

    version, promoted = register_and_promote(model_uri, name)
    print(f"registered {name} version {version}" + (f"; it is now @{CHAMPION}" if promoted else ""))


def print_trial(study, trial) -> None:
    """The progress line of a finished trial, printed by whichever worker ran it (an Optuna callback,
    module-level so that spawned workers can unpickle it)."""
    from cnnexp.tuning.report import progress_text

    print(progress_text(study, trial), flush=True)
