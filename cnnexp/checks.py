"""What a parameter must be: the rules several configs share, and the one error a refused value raises."""
from __future__ import annotations

import math
import os
import re
import tempfile


class ConfigError(ValueError):
    """A parameter a user gave is not allowed; the message names the parameter."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param


class DataError(RuntimeError):
    """Input data is missing, unreadable or not what it claims to be (the source, data_dir, a checkpoint's data)."""


def first_line(err: BaseException) -> str:
    """What a one-line error message can say of a library's exception (some span many lines)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def check_choice(param: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(param, f"unknown value {value!r}; allowed: {', '.join(allowed)}")


def check_device(device: str) -> None:
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", device):
        raise ConfigError("device", f"unknown device {device!r}; allowed: auto, cpu, cuda, cuda:N, mps")


def check_nonempty(param: str, value: str) -> None:
    if not value.strip():
        raise ConfigError(param, "must not be empty")


def check_positive(param: str, value: float) -> None:
    # "finite": inf is positive, and a line refusing it as not positive reads as wrong
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(param, f"must be a finite positive number, got {value}")


def check_timeout(timeout: float) -> None:
    if not (math.isfinite(timeout) and timeout >= 0):
        raise ConfigError("timeout", f"must be 0 (no limit) or a finite positive number of seconds, got {timeout}")


def check_cohort(cohort: int) -> None:
    if cohort < 0:
        raise ConfigError("cohort", f"must be 0 (the device's default) or a number of trials, got {cohort}")


def check_seed(seed: int) -> None:
    if not (0 <= seed < 2**32):
        raise ConfigError("seed", f"must be between 0 and 2**32 - 1, got {seed}")


def check_directory(param: str, directory: str) -> None:
    """Refuses an empty name, and a directory that is a file or lies under one, saying so (mkdir, much later,
    would only say "File exists"); a missing one is fine: it is made when first written."""
    check_nonempty(param, directory)
    existing = nearest_existing(directory)
    if os.path.isdir(existing):
        return
    if existing == os.path.abspath(directory):
        raise ConfigError(param, f"{directory} is a file, not a directory; name a directory (a missing one is created)")
    raise ConfigError(param, f"cannot create {directory}: {existing} is a file, not a directory")


def nearest_existing(path: str) -> str:
    """path, made absolute, if it exists, else its nearest parent that does (os.path's: checking a flag never
    needs pathlib's import)."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    return existing


def check_writable_dir(param: str, directory: str) -> None:
    """Refuses a directory this user cannot write (read-only, another user's, under a file) before any work is
    done in it, by writing a file in it or in the nearest parent that exists (a missing one is made later)."""
    existing = nearest_existing(directory)
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise ConfigError(param, f"cannot write in {existing} ({err.strerror or err}); choose a {param} you can "
                                 "write") from None
