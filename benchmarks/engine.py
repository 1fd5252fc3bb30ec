"""The training engine's figures, side by side in one run: a one-slot `fit` epoch at batch 100 and 1000,
and a cohort of K against K separate fits at batch 100 and at tune's batch mix, with CUDA graphs on and
off, cudnn.benchmark on and off, batch-size tables on one stream or side by side, and torch.compile.

    python benchmarks/engine.py --device cuda --out $OUT/engine.json      # the GPU figures (gpu_check.sh)
    python benchmarks/engine.py --device cpu --quick                        # a CPU smoke test

Each engine contender trains two epochs; `first` includes capturing or compiling, `second` is the steady
state. A cohort's ratio is the separate fits' summed time over the cohort's, epoch by epoch.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import DEFAULT_SOURCE, LR, SEED, load_data  # noqa: E402

from cnnexp.data import Split  # noqa: E402
from cnnexp.engine import Engine, Member  # noqa: E402
from cnnexp.train import new_training_state  # noqa: E402

TUNE_BATCHES = (16, 32, 64, 128, 256, 512, 1024)  # tune's default search space


def members(k: int, mixed: bool) -> list[Member]:
    """k points of tune's space: lrs log-spaced over 1e-4..1e-1; batch 100, or tune's sizes in turn."""
    lrs = [10 ** (-4 + 3 * i / max(k - 1, 1)) for i in range(k)]
    return [Member(lr, TUNE_BATCHES[(3 * i) % 7] if mixed else 100) for i, lr in enumerate(lrs)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def engine_epochs(train: Split, val: Split, device: torch.device, group: list[Member], refilled: bool,
                  epochs: int = 2, **options) -> list[float]:
    """Seconds per epoch of one engine holding `group` (refilled: one seed each, so orders differ)."""
    sync(device)
    started = time.perf_counter()
    engine = Engine(len(group), train, val, device, **options)
    for i, member in enumerate(group):
        engine.join(new_training_state(member.lr, SEED + i if refilled else SEED, device), member.batch_size)
    times = []
    for _ in engine.epochs():
        sync(device)
        times.append(time.perf_counter() - started)
        started = time.perf_counter()
        if len(times) == epochs:
            break
    return times


def separate(train: Split, val: Split, device: torch.device, group: list[Member], **options) -> list[float]:
    """Each member in its own one-slot engine (what `fit` is), one after the other: summed per epoch."""
    per_member = [engine_epochs(train, val, device, [m], False, **options) for m in group]
    return [sum(times[e] for times in per_member) for e in range(2)]


def row(name: str, times: list[float], baseline: list[float] | None = None, **extra) -> dict:
    result = {"contender": name, "first_s": times[0], "second_s": times[1], **extra}
    if baseline is not None:
        result["speedup_first"], result["speedup_second"] = baseline[0] / times[0], baseline[1] / times[1]
    line = f"{name:<58} epoch 1 {times[0]:8.3f} s   epoch 2 {times[1]:8.3f} s"
    if baseline is not None:
        line += f"   x{result['speedup_first']:6.2f} / x{result['speedup_second']:6.2f}"
    print(line, flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small data and cohorts: a smoke test")
    parser.add_argument("--only", default="fit,cohort,options", help="comma-separated parts")
    parser.add_argument("--sizes", default="", help="cohort sizes, e.g. 4,16,64")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    device = torch.device(args.device)
    only = set(args.only.split(","))
    n_fit, n_cohort = (3000, 1000) if args.quick else (60000, 12000)
    train, val, _, kind = load_data(DEFAULT_SOURCE, n_fit, 1000)
    small = Split(train.images[:n_cohort], train.labels[:n_cohort])
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"torch {torch.__version__}; data: {kind}", flush=True)
    cuda = device.type == "cuda"
    rows = []
    if "fit" in only:
        print(f"-- fit (one slot), {len(train.labels):,} images", flush=True)
        for batch in (100, 1000):
            one = [Member(LR, batch)]
            rows.append(row(f"fit batch {batch}", engine_epochs(train, val, device, one, False), part="fit", batch=batch))
            if cuda:
                rows.append(row(f"fit batch {batch}, no CUDA graph",
                                engine_epochs(train, val, device, one, False, graphs=False), part="fit", batch=batch))
    if "cohort" in only:
        sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else ([4, 16, 64] if cuda else [4, 8])
        if args.quick:
            sizes = sizes[:2]
        print(f"-- cohort vs separate fits, {n_cohort:,} images", flush=True)
        for mode, mixed in (("batch 100", False), ("tune's batch mix", True)):
            everyone = members(max(sizes), mixed)
            alone = [engine_epochs(small, val, device, [m], False) for m in everyone]
            for k in sizes:
                base = [sum(t[e] for t in alone[:k]) for e in range(2)]
                rows.append(row(f"{mode}: {k} separate fits", base, part="cohort", k=k, mode=mode))
                rows.append(row(f"{mode}: cohort of {k}", engine_epochs(small, val, device, everyone[:k], False),
                                base, part="cohort", k=k, mode=mode))
                rows.append(row(f"{mode}: cohort of {k}, orders differ",
                                engine_epochs(small, val, device, everyone[:k], True), base, part="cohort", k=k, mode=mode))
                if cuda and mixed:
                    rows.append(row(f"{mode}: cohort of {k}, tables on streams",
                                    engine_epochs(small, val, device, everyone[:k], True, streams=True), base,
                                    part="cohort", k=k, mode=mode))
    if "options" in only and cuda:
        print(f"-- options, tune's batch mix, cohort of 16, {n_cohort:,} images", flush=True)
        group = members(16, True)
        base = engine_epochs(small, val, device, group, True)
        rows.append(row("cohort of 16: CUDA graphs (default)", base, part="options"))
        rows.append(row("cohort of 16: no CUDA graphs", engine_epochs(small, val, device, group, True, graphs=False),
                        base, part="options"))
        torch.backends.cudnn.benchmark = True
        rows.append(row("cohort of 16: cudnn.benchmark", engine_epochs(small, val, device, group, True), base, part="options"))
        torch.backends.cudnn.benchmark = False
        rows.append(row("cohort of 16: bf16", engine_epochs(small, val, device, group, True, bf16=True), base, part="options"))
        rows.append(row("cohort of 16: torch.compile (no graphs)",
                        engine_epochs(small, val, device, group, True, torch_compile=True), base, part="options"))
    if args.out:
        Path(args.out).write_text(json.dumps({"device": str(device), "data": kind, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
