"""cnnexp orphans: RUNNING runs whose process is gone (SIGKILL, a machine lost, a store it could not write),
and how to go on.

A run killed without a chance to end itself stays RUNNING in the store. This lists those whose owner
process is gone (on this host, by pid) or, for train runs, silent (another host's heartbeat is stale);
`--end true` marks them FAILED. Either way `cnnexp train --resume <id>` continues a train run from its checkpoint.
"""
from __future__ import annotations

import sys
import time

from cnnexp.config import OrphansConfig
from cnnexp.tracking import tags
from cnnexp.tracking.owners import is_train_run, orphaned_runs
from cnnexp.tracking.runs import end_child_run
from pipelines import cli as commands
from pipelines.running import Made


def main(config: OrphansConfig) -> Made[list[str]]:
    config.validate()
    found = orphaned_runs()
    for run, owned in found:
        started = time.strftime("%Y-%m-%d %H:%M", time.localtime(run.info.start_time / 1000))
        kind = "" if is_train_run(run) else "  (not a train run)"
        print(f"{run.info.run_id}  {run.info.run_name}  started {started}  {owned.describe()}  ({owned.state}){kind}")
        if config.end:
            end_child_run(run.info.run_id, "FAILED", {tags.ERROR: f"orphaned: its process is gone ({owned.describe()})"})
    verb = "ended FAILED" if config.end else "found"
    print(f"{len(found)} orphaned run(s) {verb}; continue a train run with: cnnexp train --resume <run id>"
          + ("" if config.end or not found else "  (or end them: cnnexp orphans --end true)"))
    return Made("", [run.info.run_id for run, _ in found])


def cli(argv: list[str] | None = None, prog: str = "orphans") -> int:
    return commands.run("orphans", argv, prog)


if __name__ == "__main__":
    sys.exit(cli())
