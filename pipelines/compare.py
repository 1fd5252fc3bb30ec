"""cnnexp compare: a leaderboard of an experiment's training runs, best first, as a table and CSV."""
from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from cnnexp import plots, tracking
from cnnexp.config import CompareConfig, ConfigError
from pipelines.common import make_parser, run_entry_point

ASCENDING = ("duration_s", "run_name", "run_id")  # smaller is better (or just alphabetical)
# The same figure the registry's champion rule and tune's best trial use: each run's model's own val_accuracy.
JUDGED_BY = tracking.MODEL_SCORE


def leaderboard(runs: pd.DataFrame, sort_by: str) -> pd.DataFrame:
    if sort_by not in runs.columns:
        raise ConfigError("sort_by", f"unknown column {sort_by!r}; allowed: {', '.join(runs.columns)}")
    ascending = sort_by in ASCENDING or sort_by.endswith("loss")
    return runs.sort_values(sort_by, ascending=ascending, na_position="last", kind="stable").reset_index(drop=True)


def main(config: CompareConfig) -> pd.DataFrame:
    config.validate()
    table = leaderboard(tracking.training_runs(config.experiment), config.sort_by)
    with pd.option_context("display.width", 200, "display.max_columns", None):
        print(table.drop(columns="run_id").to_string(index=False) if len(table) else "no finished training runs")
    table.to_csv(config.output, index=False)
    print(f"leaderboard of {len(table)} runs written to {config.output}")
    if config.plot:
        figure_path = Path(config.output).with_suffix(".png")
        figure = plots.accuracy_vs_lr(table["lr"].tolist(), table[JUDGED_BY].tolist(), table["batch_size"].tolist())
        plots.save(figure, figure_path)
        print(f"val_accuracy vs lr saved to {figure_path}")
    return table


def cli(argv: list[str] | None = None, prog: str = "compare") -> int:
    return run_entry_point(make_parser(prog, __doc__, CompareConfig), CompareConfig, main, argv)


if __name__ == "__main__":
    sys.exit(cli())
