"""Side-by-side timings behind cnnexp.cohort's refilling and batch-mix choices (benchmarks/cohort_refill.md).

    python benchmarks/cohort_refill.py --images 6000 --threads 2 --repeats 3
    python benchmarks/cohort_refill.py --only conv1 --threads 1

conv1: a cohort of K=8 whose members share one order (one seed: one input, dense conv1) vs one whose
orders differ (seeds 0..7: K gathered inputs, grouped conv1), at batch 100 and at tune's batch mix.
mix: K=8 and K=4 at tune's batch mix (and K=8 at batch 100): K separate `fit`s vs the cohort at
--baseline-rev (git: masked Adam over all rows at every micro-batch) vs this checkout's. One epoch each, contenders interleaved
(A B A B ...) so background load hits them alike; medians over the repeats.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.harness import DEFAULT_SOURCE, load_data  # noqa: E402
from benchmarks.run import cohort_members  # noqa: E402

from cnnexp import cohort  # noqa: E402
from cnnexp.cohort import Member  # noqa: E402
from cnnexp.data import Split  # noqa: E402
from cnnexp.train import fit, new_training_state  # noqa: E402

CPU = torch.device("cpu")


def module_at(rev: str) -> object:
    """cnnexp/cohort.py as it was at git revision `rev`, imported under another name."""
    source = subprocess.check_output(["git", "-C", str(REPO), "show", f"{rev}:cnnexp/cohort.py"], text=True)
    spec = importlib.util.spec_from_loader(f"cohort_at_{rev}", loader=None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    exec(compile(source, f"{rev}:cnnexp/cohort.py", "exec"), module.__dict__)
    return module


def separate(members: list[Member], train: Split, val: Split) -> float:
    started = time.perf_counter()
    for member in members:
        fit(new_training_state(member.lr, 0, CPU), train, val, batch_size=member.batch_size, epochs=1)
    return time.perf_counter() - started


def cohort_at(module, members: list[Member], train: Split, val: Split) -> float:
    group = module.new_cohort(members, 0, CPU)
    started = time.perf_counter()
    module.fit_cohort(group, train, val, epochs=1)
    return time.perf_counter() - started


def new_cohort(members: list[Member], train: Split, val: Split, distinct_orders: bool = False) -> float:
    """distinct_orders: seeds 0..K-1, so every member shuffles differently (as after refills)."""
    group = cohort.new_cohort([], 0, CPU)
    for i, member in enumerate(members):
        group.add(i, member, seed=i if distinct_orders else 0)
    started = time.perf_counter()
    cohort.fit_cohort(group, train, val, epochs=1)
    return time.perf_counter() - started


def interleave(contenders: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, run in contenders.items():
            times[name].append(run())
    return times


def report(title: str, times: dict[str, list[float]], baseline: str) -> list[dict]:
    """Ratio = baseline's median time / the contender's (> 1: faster than the baseline)."""
    base = statistics.median(times[baseline])
    rows = [{"contender": name, "median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts),
             "ratio_vs_baseline": base / statistics.median(ts)} for name, ts in times.items()]
    print(f"\n{title} (baseline: {baseline})")
    for row in rows:
        print(f"  {row['contender']:<40} {row['median_s']:7.2f} s  [{row['min_s']:.2f}-{row['max_s']:.2f}]"
              f"  x{row['ratio_vs_baseline']:.2f}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=6000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", default="conv1,mix")
    parser.add_argument("--baseline-rev", default="48ecedd")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train, val, _, kind = load_data(DEFAULT_SOURCE, args.images, 1000)
    print(f"{kind}; {args.threads} threads; torch {torch.__version__}")
    results: dict = {"data": kind, "threads": args.threads, "images": args.images, "repeats": args.repeats}
    if "conv1" in args.only:
        for label, members in (("K=8 batch 100", cohort_members(8, mixed=False)),
                               ("K=8 tune's batch mix", cohort_members(8, mixed=True))):
            results[f"conv1 {label}"] = report(f"conv1, {label}", interleave({
                "one order (shared input)": lambda m=members: new_cohort(m, train, val),
                "K orders (grouped conv1)": lambda m=members: new_cohort(m, train, val, distinct_orders=True),
            }, args.repeats), "one order (shared input)")
    if "mix" in args.only:
        old = module_at(args.baseline_rev)
        for label, members in (("K=8 tune's batch mix", cohort_members(8, mixed=True)),
                               ("K=4 tune's batch mix", cohort_members(4, mixed=True)),
                               ("K=8 batch 100", cohort_members(8, mixed=False))):
            contenders = {
                f"{len(members)} separate fits": lambda m=members: separate(m, train, val),
                f"cohort at {args.baseline_rev}": lambda m=members: cohort_at(old, m, train, val),
                "cohort (this checkout)": lambda m=members: new_cohort(m, train, val),
            }
            results[label] = report(label, interleave(contenders, args.repeats), f"{len(members)} separate fits")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
