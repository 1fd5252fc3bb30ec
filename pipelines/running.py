"""Running an entry point: stop signals as Ctrl-C, runs ended with the status that happened, and every failure
as one line on stderr with an exit code (2 bad input, 1 a failure while working, 130 interrupted)."""
from __future__ import annotations

import argparse
import atexit
import contextlib
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, NoReturn, TypeVar

from cnnexp.checks import ConfigError, DataError, first_line
from cnnexp.verbosity import VERBOSE_ENV
from pipelines.flags import config_from_args
from pipelines.progress import calm_bars_off_terminal

C = TypeVar("C")
R = TypeVar("R")

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130


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


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (or a stop signal) in a run that can go on; its message names the run and says how to go on."""


def checked_config(parser: argparse.ArgumentParser, config_class: type[C], argv: list[str] | None) -> C:
    """The config the flags give, validated; argparse's own refusals come as ConfigError too (flags.py)."""
    config = config_from_args(config_class, parser.parse_args(argv))
    config.validate()
    return config


@dataclass(frozen=True)
class Made(Generic[R]):
    """What a step's main made: its run, and its result (the prepared data, a history, metrics)."""

    run_id: str
    result: R


def run_entry_point(parser: argparse.ArgumentParser, config_class: type[C], load_main: Callable[[], Callable[[C], Any]],
                    argv: list[str] | None = None) -> int:
    """Checks the flags, then loads and runs main; every failure becomes one line on stderr and a non-zero exit.

    load_main is called only once the flags are accepted: a refusal never waits for torch or MLflow to load.
    """
    pending_run = os.environ.get("MLFLOW_RUN_ID")  # set by `mlflow run`; mlflow.start_run removes it
    try:
        config = checked_config(parser, config_class, argv)
    except ConfigError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr, flush=True)
        if pending_run:  # after the line: the run `mlflow run` made says why it failed, as any failed run does
            from cnnexp.tracking import runs, store

            store.quiet_mlflow()
            runs.end_pending_run("FAILED", err, run_id=pending_run)
        return EXIT_BAD_INPUT
    from cnnexp.tracking import mlflow_private, runs, store, store_errors

    previous = {sig: signal.signal(sig, _raise_interrupt) for sig in STOP_SIGNALS}
    calm_bars_off_terminal()
    verbose = "--verbose" in (sys.argv[1:] if argv is None else argv)
    previous_verbose = os.environ.get(VERBOSE_ENV)
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
    store.quiet_mlflow()
    store.bound_http_waits()
    runs_before = runs.runs_started()
    try:
        store.check_store()
        load_main()(config)
        return 0
    except KeyboardInterrupt as stop:
        if not pending_run and runs.runs_started() == runs_before:
            print(f"{parser.prog}: interrupted before any run started", file=sys.stderr)
            return EXIT_INTERRUPTED
        runs.end_pending_run("KILLED", run_id=pending_run)
        if pending_run:
            mlflow_private.keep_killed_after_mlflow_run(pending_run)
        marked = str(stop) if isinstance(stop, Interrupted) else "the run is marked KILLED"
        print(f"{parser.prog}: interrupted; {marked}", file=sys.stderr)
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


def exit_at_once(code: int) -> NoReturn:
    """Ends a command's process as soon as its work is written, skipping the interpreter's teardown.

    That teardown frees every module and object torch and MLflow made, one by one: seconds after a run's last
    line on a loaded 2-core machine, for nothing (benchmarks/startup.py). What a normal exit does that matters
    still happens, in its order: other threads finish, atexit handlers run (temporary directories,
    multiprocessing's children, MLflow's queues), and the output is flushed.
    """
    # What the interpreter's own exit does first: the threading module's exit hooks (which tell idle
    # concurrent.futures workers, MLflow's downloads', to stop), then a join of every non-daemon thread.
    # Joined without those hooks, such a worker waits for work forever (a hung `cnnexp evaluate`).
    threading._shutdown()  # noqa: SLF001
    atexit._run_exitfuncs()  # noqa: SLF001 - the handlers os._exit would skip
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a reader gone (a closed pipe) loses nothing of ours
            stream.flush()
    os._exit(code)
