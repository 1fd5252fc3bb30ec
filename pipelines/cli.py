"""cnnexp: one command line for every step; each subcommand takes the same flags as its MLproject entry point.

A command's flags are read and checked before its module is imported: a refused value, an unknown flag or
--help is answered without loading torch, MLflow or Optuna (seconds of imports on a small machine).
"""
from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass

from cnnexp import config
from pipelines.flags import make_parser
from pipelines.running import exit_at_once, run_entry_point


@dataclass(frozen=True)
class Command:
    module: str  # its main(config) does the work; imported only once the flags are accepted
    config: type
    summary: str


COMMANDS = {
    "prepare": Command("pipelines.prepare", config.PrepareConfig, "read, check, split and record a dataset"),
    "train": Command("pipelines.train", config.TrainConfig, "train the CNN and track the run in MLflow"),
    "tune": Command("pipelines.tune", config.TuneConfig,
                    "Optuna study of lr and batch size, every trial an MLflow child run"),
    "evaluate": Command("pipelines.evaluate", config.EvaluateConfig,
                        "score a trained model: test metrics, per-class table, confusion, mistakes"),
    "main": Command("pipelines.main", config.MainConfig,
                    "prepare -> train -> evaluate as child runs, reusing finished steps"),
    "compare": Command("pipelines.compare", config.CompareConfig,
                       "leaderboard of an experiment's training runs (CSV, optional plot)"),
    "worker": Command("pipelines.worker", config.WorkerConfig,
                      "join a study `tune` created (any machine) and run its trials"),
    "orphans": Command("pipelines.orphans", config.OrphansConfig,
                       "list RUNNING train runs whose process is gone (SIGKILL, a lost machine); --end ends them"),
    "export": Command("pipelines.export", config.ExportConfig,
                      "write a logged model as ONNX, checked against its pyfunc on real images"),
}


def usage() -> str:
    lines = ["usage: cnnexp COMMAND [--help] [flags]", "", "commands:"]
    lines += [f"  {name:<10} {command.summary}" for name, command in COMMANDS.items()]
    lines += ["", "`cnnexp COMMAND --help` lists a command's flags with their defaults."]
    return "\n".join(lines)


def run(name: str, argv: list[str] | None = None, prog: str | None = None) -> int:
    """One command: its flags parsed and checked, then its module imported and its main run."""
    command = COMMANDS[name]
    parser = make_parser(prog or name, command.summary, command.config)
    return run_entry_point(parser, command.config, lambda: importlib.import_module(command.module).main, argv)


def main(argv: list[str] | None = None, prefix: str = "cnnexp ") -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] not in COMMANDS:
        print(f"cnnexp: error: unknown command {argv[0]!r}; allowed: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return run(argv[0], argv[1:], prog=prefix + argv[0])


def entry() -> None:
    """The `cnnexp` command."""
    exit_at_once(main())


if __name__ == "__main__":  # MLproject's entry points: their lines start with the entry point's own name
    exit_at_once(main(prefix=""))
