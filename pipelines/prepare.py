"""mlflow run . -e prepare: read, check, split and record the dataset."""
from __future__ import annotations

import sys

from cnnexp import tracking
from cnnexp.config import PrepareConfig
from cnnexp.data import PreparedData, prepare
from pipelines.common import announce_stand_in, make_parser, run_entry_point


def main(config: PrepareConfig) -> PreparedData:
    config.validate()
    with tracking.tracked_run(run_name=f"prepare-{config.dataset}"):
        tracking.log_config(config)
        data, reused = prepare(config)
        announce_stand_in(data, config.dataset)
        tracking.log_prepared_data(data)
        tracking.set_tags({"reused": str(reused).lower()})
    counts = ", ".join(f"{name} {len(split)}" for name, split in data.splits.items())
    verb = "reused" if reused else "prepared"
    print(f"{verb} {config.dataset} in {data.path}: {counts}; digest {data.digest}")
    return data


def cli(argv: list[str] | None = None, prog: str = "prepare") -> int:
    return run_entry_point(make_parser(prog, __doc__, PrepareConfig), PrepareConfig, main, argv)


if __name__ == "__main__":
    sys.exit(cli())
