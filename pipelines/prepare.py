"""mlflow run . -e prepare: read, check, split and record the dataset."""
from __future__ import annotations

import sys

from cnnexp.config import PrepareConfig
from cnnexp.data import PreparedData, prepare
from cnnexp.tracking import tags
from cnnexp.tracking.log import log_config, log_prepared_data
from cnnexp.tracking.runs import set_tags, tracked_run
from pipelines import cli as commands
from pipelines.prepared import announce_stand_in
from pipelines.running import Made


def main(config: PrepareConfig) -> Made[PreparedData]:
    config.validate()
    with tracked_run(run_name=f"prepare-{config.dataset}") as run:
        log_config(config)
        data, reused = prepare(config)
        announce_stand_in(data, config.dataset)
        log_prepared_data(data)
        set_tags({tags.REUSED_DATA: str(reused).lower()})
    counts = ", ".join(f"{name} {len(split)}" for name, split in data.splits.items())
    verb = "reused" if reused else "prepared"
    print(f"{verb} {config.dataset} in {data.path}: {counts}; digest {data.digest}")
    return Made(run.info.run_id, data)


def cli(argv: list[str] | None = None, prog: str = "prepare") -> int:
    return commands.run("prepare", argv, prog)


if __name__ == "__main__":
    sys.exit(cli())
