"""cnnexp compare: a leaderboard of an experiment's training runs, best first; CSV and plot where asked."""
from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from cnnexp import plots
from cnnexp.config import CompareConfig, ConfigError
from cnnexp.ranking import RANKING_METRIC
from cnnexp.tracking.queries import training_runs
from pipelines import cli as commands

ASCENDING = ("train_time_s", "run_name", "run_id", "kind")  # smaller is better (or just alphabetical)
# The same figure the registry's champion rule and tune's best trial use.
METRIC_MEANING = {RANKING_METRIC: "each run's logged model's own val_accuracy: its kept epoch's"}


def leaderboard(runs: pd.DataFrame, sort_by: str) -> pd.DataFrame:
    """Ranked within each dataset (an MNIST accuracy is no better than a Fashion-MNIST one), datasets by name."""
    if sort_by not in runs.columns:
        raise ConfigError("sort_by", f"unknown column {sort_by!r}; allowed: {', '.join(runs.columns)}")
    ascending = sort_by in ASCENDING or sort_by.endswith("loss")
    keys = ["dataset"] + ([sort_by] if sort_by != "dataset" else [])
    return runs.sort_values(keys, ascending=[True, ascending][:len(keys)], na_position="last",
                            kind="stable").reset_index(drop=True)


def mixed_datasets(table: pd.DataFrame) -> str | None:
    """One line when the runs trained on several datasets, naming them and their counts."""
    counts = table["dataset"].replace("", "unknown").value_counts(sort=False)
    if len(counts) < 2:
        return None
    listed = ", ".join(f"{name} {count}" for name, count in counts.items())
    return f"runs of {len(counts)} datasets ({listed}): ranked within each dataset, never across"


def heading(config: CompareConfig, table: pd.DataFrame, trials_left_out: int) -> str:
    """What the table ranks, by which metric, and what it leaves out."""
    order = "smallest first" if config.sort_by in ASCENDING or config.sort_by.endswith("loss") else "best first"
    meaning = f" ({METRIC_MEANING[config.sort_by]})" if config.sort_by in METRIC_MEANING else ""
    kinds = "training runs and tuning trials" if config.include_trials else "training runs"
    left_out = f"; {trials_left_out} tuning trials left out (--include-trials true ranks them too)" if trials_left_out else ""
    return f"{len(table)} finished {kinds} of experiment {config.experiment!r}, by {config.sort_by}{meaning}, {order}{left_out}"


def main(config: CompareConfig) -> pd.DataFrame:
    config.validate()
    runs, trials_left_out = training_runs(config.experiment, config.include_trials)
    table = leaderboard(runs, config.sort_by)
    print(heading(config, table, trials_left_out))
    if (mixed := mixed_datasets(table)) is not None:
        print(mixed)
    with pd.option_context("display.width", 250, "display.max_columns", None):
        print(table.to_string(index=False) if len(table) else "no finished training runs")
    if config.output:
        write_files(config, table)
    return table


def write_files(config: CompareConfig, table: pd.DataFrame) -> None:
    output = Path(config.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(output, index=False)
    print(f"leaderboard of {len(table)} runs written to {output}")
    if config.plot:
        figure_path = output.with_suffix(".png")
        figure = plots.accuracy_vs_lr(table["lr"].tolist(), table[RANKING_METRIC].tolist(), table["batch_size"].tolist(),
                                      table["dataset"].tolist())
        plots.save(figure, figure_path)
        print(f"{RANKING_METRIC} vs lr saved to {figure_path}")


def cli(argv: list[str] | None = None, prog: str = "compare") -> int:
    return commands.run("compare", argv, prog)


if __name__ == "__main__":
    sys.exit(cli())
