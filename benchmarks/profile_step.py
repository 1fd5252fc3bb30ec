"""Where a training step's time goes: torch.profiler over batch-100 steps, the tutorial's loop vs fit's (the
training engine with one slot).

    python benchmarks/profile_step.py [--steps 60] [--threads 1]

Prints the top operators by self CPU time for each setup; used to choose what fit optimises.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cnnexp.data import Split  # noqa: E402
from cnnexp.model import Network, to_inputs  # noqa: E402
from cnnexp.train import fit, new_training_state  # noqa: E402


def tutorial_steps(images: torch.Tensor, labels: torch.Tensor, batch_size: int = 100) -> None:
    torch.manual_seed(0)
    model = Network()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    x = to_inputs(images)
    for start in range(0, len(labels), batch_size):
        loss = F.cross_entropy(model(x[start : start + batch_size]), labels[start : start + batch_size])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def fit_steps(images: torch.Tensor, labels: torch.Tensor, batch_size: int = 100) -> None:
    """One epoch of fit over the images (its one validation pass on 100 of them included)."""
    split = Split(images, labels)
    fit(new_training_state(0.01, 0, torch.device("cpu")), split, Split(images[:100], labels[:100]),
        batch_size=batch_size, epochs=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 keeps the default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    images = torch.randint(0, 256, (args.steps * 100, 28, 28), dtype=torch.uint8)
    labels = torch.randint(0, 10, (args.steps * 100,))
    for name, run in (("tutorial (NCHW, for-loop Adam)", tutorial_steps), ("fit (the engine, one slot)", fit_steps)):
        run(images[:1000], labels[:1000])  # warm-up: oneDNN picks and caches its kernels
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            run(images, labels)
        total_ms = sum(e.self_cpu_time_total for e in prof.key_averages()) / 1000
        print(f"\n== {name}: {total_ms / args.steps:.2f} ms of CPU per step, threads {torch.get_num_threads()}")
        print(prof.key_averages(group_by_input_shape=True).table(
            sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=34, max_shapes_column_width=44))


if __name__ == "__main__":
    main()
