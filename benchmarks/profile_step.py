"""Where a training step's time goes: torch.profiler over batch-100 steps, tutorial setup vs fit's.

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
from cnnexp.model import Network  # noqa: E402
from cnnexp.train import new_training_state  # noqa: E402


def tutorial_setup() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = Network()
    return model, torch.optim.Adam(model.parameters(), lr=0.01)


def fit_setup() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    state = new_training_state(0.01, 0, torch.device("cpu"))
    return state.model, state.optimizer


def steps(model, optimizer, x, y, n: int, batch_size: int = 100) -> None:
    for i in range(n):
        rows = slice(i * batch_size, (i + 1) * batch_size)
        loss = F.cross_entropy(model(x[rows]), y[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 keeps the default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    x = torch.rand(args.steps * 100, 1, 28, 28)
    y = torch.randint(0, 10, (args.steps * 100,))
    for name, setup in (("tutorial (NCHW, for-loop Adam)", tutorial_setup), ("fit (channels_last, fused Adam)", fit_setup)):
        model, optimizer = setup()
        steps(model, optimizer, x, y, 10)  # warm-up: oneDNN picks and caches its kernels
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            steps(model, optimizer, x, y, args.steps)
        total_ms = sum(e.self_cpu_time_total for e in prof.key_averages()) / 1000
        print(f"\n== {name}: {total_ms / args.steps:.2f} ms of CPU per step, threads {torch.get_num_threads()}")
        print(prof.key_averages(group_by_input_shape=True).table(
            sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=34, max_shapes_column_width=44))


if __name__ == "__main__":
    main()
