"""What every entry point shares: flags from a config dataclass, one-line errors, run endings, shared steps' parts."""
from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from cnnexp.checks import ConfigError, DataError, first_line
from cnnexp.config import VERBOSE_ENV
from pipelines.progress import calm_bars_off_terminal

# torch, MLflow and Optuna are imported by the functions that use them: `--help` and a mistyped flag stay
# instant, and a command imports only what it runs.
if TYPE_CHECKING:
    from cnnexp.data import PreparedData

C = TypeVar("C")
R = TypeVar("R")

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_arguments(parser: argparse.ArgumentParser, config_class: type) -> None:
    """One flag per dataclass field, with its default and allowed values in --help."""
    for f in dataclasses.fields(config_class):
        kind = {"bool": parse_bool, "int": int, "float": float}.get(str(f.type), str)
        help_text = f.metadata.get("help", "")
        if "choices" in f.metadata:
            help_text += f" (one of: {', '.join(f.metadata['choices'])})"
        elif kind is parse_bool:
            help_text += " (true or false)"
        aliases = [flag(f.name)] + ([f"--{f.name}"] if "_" in f.name else [])
        parser.add_argument(
            *aliases,
            dest=f.name,
            type=kind,
            default=f.default,
            metavar=f.name.upper(),
            help=f"{help_text} [default: {f.default!r}]",
        )


def config_from_args(config_class: type[C], args: argparse.Namespace) -> C:
    return config_class(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config_class)})


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own messages name the flag already
        unknown = message.removeprefix("unrecognized arguments: ").split()
        if message.startswith("unrecognized arguments: ") and unknown:
            raise ConfigError("arguments", f"unknown parameter {unknown[0]} (not one of {self.prog}'s; "
                                           f"`{self.prog} --help` lists them)")
        raise ConfigError("arguments", message)


def make_parser(prog: str, description: str, config_class: type) -> argparse.ArgumentParser:
    # No abbreviations: `--epoch 1` (or MLflow's `-P epoch=1`, passed on as `--epoch 1`) must be refused,
    # not silently taken as --epochs while the run's params record something else.
    parser = _OneLineParser(prog=prog, description=description, allow_abbrev=False)
    add_config_arguments(parser, config_class)
    parser.add_argument("--verbose", action="store_true",
                        help=f"show MLflow's and Optuna's own log lines and warnings, and full tracebacks on errors "
                             f"(or set {VERBOSE_ENV}=1, e.g. for mlflow run)")
    return parser


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _raise_interrupt(signum, frame):
    # `mlflow run` stops a script with SIGTERM; handling it like Ctrl-C lets runs end KILLED, not RUNNING.
    # Ctrl-C under `mlflow run` brings SIGINT and then mlflow's SIGTERM: later signals must not cut
    # short the cleanup (ending the run KILLED, saving its checkpoint) that the first one started. They get
    # a handler that does nothing, not SIG_IGN: a signal already pending when its handler becomes SIG_IGN
    # makes CPython raise "OSError: Signal 15 ignored due to race condition" in the middle of that cleanup.
    for sig in STOP_SIGNALS:
        signal.signal(sig, _ignore)
    raise KeyboardInterrupt(f"signal {signum}")


def _ignore(signum, frame) -> None:
    """A stop signal after the first: the cleanup the first one started goes on."""


@dataclass(frozen=True)
class Made(Generic[R]):
    """What a step's main made: its run, and its result (the prepared data, a history, metrics)."""

    run_id: str
    result: R


def run_entry_point(parser: argparse.ArgumentParser, config_class: type[C], main: Callable[[C], Any],
                    argv: list[str] | None = None) -> int:
    """Parses, runs main, and turns every failure into one line on stderr and a non-zero exit code."""
    from cnnexp.tracking import mlflow_private, runs, store, store_errors

    previous = {sig: signal.signal(sig, _raise_interrupt) for sig in STOP_SIGNALS}
    pending_run = os.environ.get("MLFLOW_RUN_ID")  # set by `mlflow run`; mlflow.start_run removes it
    calm_bars_off_terminal()
    verbose = "--verbose" in (sys.argv[1:] if argv is None else argv)
    previous_verbose = os.environ.get(VERBOSE_ENV)
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
    store.quiet_mlflow()
    store.bound_http_waits()
    runs_before = runs.runs_started()
    try:
        args = parser.parse_args(argv)
        store.check_store()
        main(config_from_args(config_class, args))
        return 0
    except KeyboardInterrupt:
        if not pending_run and runs.runs_started() == runs_before:
            print(f"{parser.prog}: interrupted before any run started", file=sys.stderr)
            return EXIT_INTERRUPTED
        runs.end_pending_run("KILLED", run_id=pending_run)
        if pending_run:
            mlflow_private.keep_killed_after_mlflow_run(pending_run)
        print(f"{parser.prog}: interrupted; the run is marked KILLED", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:
        runs.end_pending_run("FAILED", err, run_id=pending_run)
        if verbose:
            traceback.print_exc()
        err = store_errors.unwritable_store(err) or err
        print(f"{parser.prog}: error: {first_line(err)}", file=sys.stderr)
        # Bad input is a parameter refused, or data the user pointed at that is missing or damaged: 2,
        # wherever it was found; a failure while working (a crash, a loss gone NaN, a lost server): 1.
        return EXIT_BAD_INPUT if isinstance(err, (ConfigError, DataError)) else EXIT_FAILED
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if previous_verbose is None:  # a caller in the same process (tests, main's steps) is not made loud
            os.environ.pop(VERBOSE_ENV, None)
        else:
            os.environ[VERBOSE_ENV] = previous_verbose


def load_or_prepare(config) -> PreparedData:
    """The prepared data a train or tune config names, prepared first where it is not (said in one line)."""
    from cnnexp.data import is_prepared, load_prepared, prepare

    if is_prepared(config.data_dir, config.dataset):
        data = load_prepared(config.data_dir, config.dataset)
    else:
        print(f"{config.dataset} is not prepared in {config.data_dir}; preparing it first")
        data = prepare(config.prepare_config())[0]
    announce_stand_in(data, config.dataset)
    return data


def announce_stand_in(data: PreparedData, dataset: str) -> None:
    """Says so when the data prepared for `dataset` is the bundled sample (a failed download fell back to it)."""
    from cnnexp.data import stand_in_notice

    notice = stand_in_notice(data, dataset)
    if notice:
        print(notice)


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
