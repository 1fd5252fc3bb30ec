"""cnnexp: one command line for every step; each subcommand takes the same flags as its MLproject entry point."""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "prepare": ("pipelines.prepare", "read, check, split and record a dataset"),
    "train": ("pipelines.train", "train the CNN and track the run in MLflow"),
    "tune": ("pipelines.tune", "Optuna study of lr and batch size, every trial an MLflow child run"),
    "evaluate": ("pipelines.evaluate", "score a trained model: test metrics, per-class table, confusion, mistakes"),
    "main": ("pipelines.main", "prepare -> train -> evaluate as child runs, reusing finished steps"),
    "compare": ("pipelines.compare", "leaderboard of an experiment's training runs (CSV, optional plot)"),
    "worker": ("pipelines.worker", "join a study `tune` created (any machine) and run its trials"),
    "orphans": ("pipelines.orphans", "list RUNNING train runs whose process is gone (SIGKILL, a lost machine); --end ends them"),
    "export": ("pipelines.export", "write a logged model as ONNX, checked against its pyfunc on real images"),
}


def usage() -> str:
    lines = ["usage: cnnexp COMMAND [--help] [flags]", "", "commands:"]
    lines += [f"  {name:<10} {summary}" for name, (_, summary) in COMMANDS.items()]
    lines += ["", "`cnnexp COMMAND --help` lists a command's flags with their defaults."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] not in COMMANDS:
        print(f"cnnexp: error: unknown command {argv[0]!r}; allowed: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.cli(argv[1:], prog=f"cnnexp {argv[0]}")


if __name__ == "__main__":
    sys.exit(main())
