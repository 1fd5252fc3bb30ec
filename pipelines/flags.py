"""A command's flags, one per field of its config dataclass: defaults and allowed values in --help, no
abbreviations, and every refusal as one ConfigError line."""
from __future__ import annotations

import argparse
import dataclasses
from typing import TypeVar

from cnnexp.checks import ConfigError
from cnnexp.verbosity import VERBOSE_ENV

C = TypeVar("C")


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
            raise ConfigError("arguments", f"unknown parameter {self._as_given(unknown[0])} (not one of "
                                           f"{self.prog}'s; `{self._command()} --help` lists them)")
        raise ConfigError("arguments", message)

    def _entry_point(self) -> bool:
        """An MLproject entry point's parser (prog `train`), not cnnexp's (prog `cnnexp train`)."""
        return not self.prog.startswith("cnnexp ")

    def _as_given(self, flag_text: str) -> str:
        """The parameter as the user wrote it: `mlflow run` passes -P epoch=1 on as --epoch 1."""
        if self._entry_point() and flag_text.startswith("--"):
            return f"-P {flag_text[2:].split('=')[0]}"
        return flag_text

    def _command(self) -> str:
        return f"cnnexp {self.prog}" if self._entry_point() else self.prog


def make_parser(prog: str, description: str, config_class: type) -> argparse.ArgumentParser:
    # No abbreviations: `--epoch 1` (or MLflow's `-P epoch=1`, passed on as `--epoch 1`) must be refused,
    # not silently taken as --epochs while the run's params record something else.
    parser = _OneLineParser(prog=prog, description=description, allow_abbrev=False)
    add_config_arguments(parser, config_class)
    parser.add_argument("--verbose", action="store_true",
                        help=f"show MLflow's and Optuna's own log lines and warnings, and full tracebacks on errors "
                             f"(or set {VERBOSE_ENV}=1, e.g. for mlflow run)")
    return parser
