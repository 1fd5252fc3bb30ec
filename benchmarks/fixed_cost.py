"""What a person waits for outside the epochs: refusals, --help, and a 1-epoch train's wall minus its epoch.

Each case runs as the real command (`python -m pipelines.cli ...`, as MLproject and `cnnexp` run it) in a fresh
process, for this checkout and, side by side, interleaved, for another one (the landed main, say):

    git worktree add /tmp/base origin/main
    python benchmarks/fixed_cost.py --baseline /tmp/base --repeats 5

The train case uses the bundled sample (`--dataset fashion-mnist-sample`) in a working directory per checkout
whose store and data a first, uncounted run made: "an existing store". Its fixed cost is the process's wall
time minus the epoch time the run itself prints; what the epoch line reports is not counted twice.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
REFUSALS = {
    "train --lr -1": ["train", "--lr", "-1"],
    "tune --n-trials 0": ["tune", "--n-trials", "0"],
    "train --help": ["train", "--help"],
}
TRAIN = ["train", "--epochs", "1", "--dataset", "fashion-mnist-sample"]
EPOCH_LINE = re.compile(r"epoch\s+1/1 .* (\d+\.\d+)s$", re.M)


def run(tree: Path, args: list[str], cwd: Path) -> tuple[float, str]:
    """The command's wall time, from before the interpreter starts to after the process has gone, and its output."""
    env = {**os.environ, "PYTHONPATH": str(tree), "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}"}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    return time.perf_counter() - started, done.stdout + done.stderr


def train_fixed_cost(tree: Path, cwd: Path) -> dict[str, float]:
    wall, output = run(tree, TRAIN, cwd)
    found = EPOCH_LINE.search(output)
    if found is None:
        raise RuntimeError(f"{tree}: no epoch line in the train output:\n{output[-2000:]}")
    epoch = float(found.group(1))
    return {"wall_s": wall, "epoch_s": epoch, "fixed_s": wall - epoch}


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def measure(trees: dict[str, Path], repeats: int) -> dict:
    cwds = {name: Path(tempfile.mkdtemp(prefix=f"fixed-cost-{name}-")) for name in trees}
    for name, tree in trees.items():
        train_fixed_cost(tree, cwds[name])  # makes the store and prepares the sample: not counted
    samples: dict[str, dict[str, list[float]]] = {name: {} for name in trees}
    for _ in range(repeats):
        for name, tree in trees.items():  # interleaved: a machine that slows down slows both
            for case, args in REFUSALS.items():
                samples[name].setdefault(case, []).append(run(tree, args, cwds[name])[0])
            for key, value in train_fixed_cost(tree, cwds[name]).items():
                samples[name].setdefault(f"train 1 epoch: {key}", []).append(value)
    return {name: {case: summary(values) for case, values in cases.items()} for name, cases in samples.items()}


def print_table(results: dict) -> None:
    names = list(results)
    cases = list(results[names[0]])
    print(f"{'case':<28}" + "".join(f"{name + ' median (min-max)':>34}" for name in names)
          + ("   ratio" if len(names) == 2 else ""))
    for case in cases:
        cells = [results[name][case] for name in names]
        line = f"{case:<28}" + "".join(f"{c['median']:>14.2f} s ({c['min']:.2f}-{c['max']:.2f})".rjust(34)
                                       for c in cells)
        if len(names) == 2:
            line += f"   {cells[0]['median'] / cells[1]['median']:.2f}"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, help="another checkout to run side by side (e.g. the landed main)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, help="write the figures as JSON too")
    args = parser.parse_args()
    trees = {"this": HERE} | ({"baseline": args.baseline.resolve()} if args.baseline else {})
    load = os.getloadavg()[0]
    results = measure(trees, args.repeats)
    print(f"load average at the start: {load:.2f}, at the end: {os.getloadavg()[0]:.2f}; {os.cpu_count()} cores; "
          f"{args.repeats} repeats")
    print_table(results)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
