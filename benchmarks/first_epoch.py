"""Is a process's first epoch slower than its second, and where does the difference go?

One fresh process trains `fit` for three epochs at batch 100 on 60,000 images (the real sample tiled; see
harness.load_data) and prints each epoch's time as the run reports it (the engine's own clock, from the
epoch's start), its wall and CPU time since the previous epoch ended (for epoch 1: since fit was called, so
the engine's set-up, the data's conversion included), and its steps' times: the first few one by one and
the median of the rest. A step that is slow only the first time is one-time set-up (oneDNN primitives
made per shape, allocator growth); a whole first epoch that is slow is something else.

    python benchmarks/first_epoch.py [--threads N] [--batch-size 100] [--out first_epoch.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.harness import DEFAULT_SOURCE, LR, SEED, load_data  # noqa: E402
from cnnexp.train import fit, new_training_state  # noqa: E402

FIRST_STEPS = 5


def measure(batch_size: int, epochs: int) -> list[dict]:
    train, val, _, kind = load_data(DEFAULT_SOURCE, 60_000, 10_000)
    print(kind)
    steps: list[list[float]] = []  # the first step's time includes fit's set-up (the engine, the data's conversion)
    marks = {"wall": time.perf_counter(), "cpu": time.process_time(), "step": time.perf_counter()}
    epochs_seen: list[dict] = []

    def on_batch_end(step, losses) -> None:
        now = time.perf_counter()
        if not steps or len(steps[-1]) * batch_size >= len(train.labels):
            steps.append([])
        steps[-1].append(now - marks["step"])
        marks["step"] = now

    def on_epoch_end(metrics: dict, _state) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        epoch_steps = steps[len(epochs_seen)]
        epochs_seen.append({
            "epoch": metrics["epoch"], "wall_s": wall - marks["wall"], "cpu_s": cpu - marks["cpu"],
            "reported_s": metrics["epoch_time_s"], "first_steps_s": epoch_steps[:FIRST_STEPS],
            "median_step_s": statistics.median(epoch_steps[FIRST_STEPS:]), "steps": len(epoch_steps),
        })
        marks.update(wall=wall, cpu=cpu, step=time.perf_counter())

    state = new_training_state(LR, SEED, torch.device("cpu"))
    fit(state, train, val, batch_size=batch_size, epochs=epochs, on_epoch_end=on_epoch_end, on_batch_end=on_batch_end)
    return epochs_seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 leaves torch's default")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    rows = measure(args.batch_size, args.epochs)
    print(f"batch {args.batch_size}, {torch.get_num_threads()} threads, load average {load:.2f} -> "
          f"{os.getloadavg()[0]:.2f}")
    for row in rows:
        first = " ".join(f"{s * 1000:.0f}" for s in row["first_steps_s"])
        print(f"epoch {row['epoch']}: wall {row['wall_s']:.2f} s, cpu {row['cpu_s']:.2f} s, reported "
              f"{row['reported_s']:.2f} s; first steps {first} ms, median step after them "
              f"{row['median_step_s'] * 1000:.1f} ms")
    print(f"epoch 1 / epoch 2: reported {rows[0]['reported_s'] / rows[1]['reported_s']:.2f}x, "
          f"wall {rows[0]['wall_s'] / rows[1]['wall_s']:.2f}x, cpu {rows[0]['cpu_s'] / rows[1]['cpu_s']:.2f}x "
          f"(epoch 1's wall and cpu with fit's set-up)")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
