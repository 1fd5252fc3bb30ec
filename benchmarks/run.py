"""Side-by-side timings of cnnexp against the tutorial's loop: prints a table, writes JSON.

    python benchmarks/run.py                 # all benchmarks, about 8 minutes on an idle 2-core CPU
    python benchmarks/run.py --quick         # fewer repeats on 12,000 images: a smoke test
    python benchmarks/run.py --only epoch,eval --device cuda

Contenders are interleaved (A B A B ...) on the same data, so background load hits them alike;
figures are medians over the repeats, ratios are baseline median / contender median.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.harness import (DEFAULT_SOURCE, LR, SEED, Bench, fit_epochs, interleave, load_data,  # noqa: E402
                                summarise, write_torchvision_root)
from cnnexp.data import Split  # noqa: E402
from cnnexp.devices import resolve_device  # noqa: E402
from cnnexp.evaluate import predict  # noqa: E402
from cnnexp.model import Network, to_inputs  # noqa: E402
from cnnexp.train import fit, new_training_state  # noqa: E402

# ---------------------------------------------------------------- data


def tutorial_dataset(root: Path, train: bool):
    from torchvision import datasets, transforms

    return datasets.FashionMNIST(str(root), train=train, download=False, transform=transforms.ToTensor())


# ---------------------------------------------------------------- contenders


def tutorial_epoch(b: Bench, batch_size: int) -> dict:
    """The tutorial's loop: ToTensor per item, DataLoader, Adam, cross-entropy, .item() per batch.

    Same init (seed), same hyperparameters and the same batch composition as fit: the sampler is the
    permutation fit draws from a generator seeded alike.
    """
    dataset = tutorial_dataset(b.tutorial_root, train=True)
    torch.manual_seed(SEED)
    network = Network().to(b.device)
    optimizer = torch.optim.Adam(network.parameters(), lr=LR)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(SEED)).tolist()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=order)
    started = time.perf_counter()
    total_loss, total_correct = 0.0, 0
    for images, labels in loader:
        images, labels = images.to(b.device), labels.to(b.device)
        preds = network(images)
        loss = F.cross_entropy(preds, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total_loss += loss.item() * len(labels)
        total_correct += preds.argmax(dim=1).eq(labels).sum().item()
    return {"seconds": time.perf_counter() - started, "train_loss": total_loss / len(dataset)}


def fit_two_epochs(b: Bench, **options) -> dict:
    """Batch 100: the second epoch's time (steady state) and how much longer the first took (compilation,
    cuDNN autotuning). fit's own per-epoch clock, validation included."""
    state = new_training_state(LR, SEED, b.device)
    _, history = fit(state, b.train, b.val, batch_size=100, epochs=2, **options)
    first, second = (epoch["epoch_time_s"] for epoch in history)
    return {"seconds": second, "first_epoch_extra_s": first - second}


# ---------------------------------------------------------------- benchmarks


def bench_epoch(b: Bench) -> dict:
    """1. Epoch time: tutorial loop vs fit, at batch 100 and 1000."""
    contenders = {}
    for bs in (100, 1000):
        contenders[f"tutorial bs{bs}"] = lambda bs=bs: tutorial_epoch(b, bs)
        contenders[f"fit bs{bs}"] = lambda bs=bs: fit_epochs(b, bs)
    results = interleave(contenders, b.repeats)
    rows = summarise({k: v for k, v in results.items() if k.endswith("bs100")}, "tutorial bs100")
    rows += summarise({k: v for k, v in results.items() if k.endswith("bs1000")}, "tutorial bs1000")
    # Same init, sampler order and hyperparameters: the first epoch's mean loss should agree closely
    # (kernels differ in summation order, so not bit for bit).
    losses = {name: runs[0]["train_loss"] for name, runs in results.items()}
    return {"unit": "s/epoch", "rows": rows, "first_epoch_train_loss": losses}


def bench_options(b: Bench) -> dict:
    """fit's optional bf16 autocast and torch.compile vs plain fit (they stay off by default where they lose)."""
    contenders = {
        "fit": lambda: fit_two_epochs(b),
        "fit bf16": lambda: fit_two_epochs(b, bf16=True),
        "fit compile": lambda: fit_two_epochs(b, torch_compile=True),
        "fit bf16+compile": lambda: fit_two_epochs(b, bf16=True, torch_compile=True),
    }
    results = interleave(contenders, b.repeats)
    extra = {name: statistics.median(r["first_epoch_extra_s"] for r in runs) for name, runs in results.items()}
    return {"unit": "s/epoch", "rows": summarise(results, "fit"), "first_epoch_extra_s": extra,
            "notes": ["steady-state (second) epochs; first epoch longer by: "
                      + ", ".join(f"{name} {seconds:.1f}s" for name, seconds in extra.items())]}


def bench_tracking(b: Bench) -> dict:
    """2. fit with MLflow tracking (log.log_epoch under a run, sqlite store) vs without."""
    if importlib.util.find_spec("mlflow") is None:
        return {"skipped": "mlflow is not installed"}
    import mlflow

    from cnnexp.tracking import log, runs
    from cnnexp.tracking.store import tracking_uri, use_tracking_uri

    epochs = 2
    # Its own store and experiment, named per run rather than set process-wide: the tuning benchmarks
    # that follow in the same process open stores of their own.
    previous_uri = tracking_uri()
    with tempfile.TemporaryDirectory(prefix="cnnexp-bench-") as store:
        use_tracking_uri(f"sqlite:///{store}/mlflow.db")
        experiment_id = mlflow.create_experiment("benchmark-tracking")

        def tracked() -> dict:
            spent = []  # seconds inside each log_epoch call

            def timed_log_epoch(metrics: dict, _state) -> None:
                started = time.perf_counter()
                log.log_epoch(metrics)
                spent.append(time.perf_counter() - started)

            with runs.tracked_run(experiment_id=experiment_id):
                result = fit_epochs(b, 100, epochs, on_epoch_end=timed_log_epoch)
                started = time.perf_counter()
                log.flush()  # once per run: waits for the queued writes
                flush_s = time.perf_counter() - started
            return {**result, "log_s": sum(spent) / epochs, "flush_s": flush_s}

        try:
            results = interleave({"fit untracked": lambda: fit_epochs(b, 100, epochs), "fit tracked": tracked}, b.repeats)
        finally:
            use_tracking_uri(previous_uri)
    rows = summarise(results, "fit untracked")
    untracked = rows[0]["median"]
    rows[1]["overhead_pct"] = 100 * (rows[1]["median"] - untracked) / untracked
    # The wall-clock difference is within the noise of a shared machine; the time spent inside the
    # tracking calls themselves is the sharper figure.
    log_s = statistics.median(r["log_s"] for r in results["fit tracked"])
    return {
        "unit": "s/epoch", "rows": rows, "epochs_per_run": epochs,
        "log_epoch_s": log_s, "tracking_call_pct_of_epoch": 100 * log_s / untracked,
        "flush_s_per_run": statistics.median(r["flush_s"] for r in results["fit tracked"]),
    }


def bench_eval(b: Bench) -> dict:
    """3. Evaluation throughput on the test split: tutorial-style DataLoader prediction vs predict()."""
    dataset = tutorial_dataset(b.tutorial_root, train=False)
    model = new_training_state(LR, SEED, b.device).network()

    @torch.no_grad()
    def tutorial() -> dict:  # the tutorial's get_all_preds over a batch-10000 loader
        started = time.perf_counter()
        preds = torch.cat([model(x.to(b.device)) for x, _ in torch.utils.data.DataLoader(dataset, batch_size=10000)])
        preds.sum().item()
        return {"images_per_s": len(dataset) / (time.perf_counter() - started)}

    def ours() -> dict:  # resident split: uint8 -> float once, then predict
        started = time.perf_counter()
        logits = predict(model, to_inputs(b.test.images.to(b.device)))
        logits.sum().item()  # waits for an asynchronous device
        return {"images_per_s": len(b.test.labels) / (time.perf_counter() - started)}

    results = interleave({"tutorial eval": tutorial, "predict": ours}, b.repeats, warm_up=True)
    return {"unit": "images/s", "rows": summarise(results, "tutorial eval", "images_per_s", higher_is_better=True)}


_worker: dict = {}


def _init_worker(train: Split, val: Split, device: str, threads: int) -> None:
    torch.set_num_threads(threads)
    _worker.update(train=train, val=val, device=torch.device(device))


def _one_trial(seed: int) -> float:
    """A short trial as a tuning study runs it: fresh state, one epoch, validation; returns val accuracy."""
    state = new_training_state(LR, seed, _worker["device"])
    _, history = fit(state, _worker["train"], _worker["val"], batch_size=100, epochs=1)
    return history[-1]["val_accuracy"]


def threads_per_worker(b: Bench, k: int) -> int:
    """The main process's threads (all cores, or --threads) split among k workers: oversubscribed
    OpenMP threads stall every small op. On a GPU the CPU only launches kernels."""
    return 1 if b.device.type == "cuda" else max(1, torch.get_num_threads() // k)


def concurrent_trials(b: Bench, k: int, trials: int, train: Split) -> dict:
    """Aggregate trials per minute of k worker processes sharing the machine (and its one GPU, if any)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    threads = threads_per_worker(b, k)
    # spawn: CUDA cannot be forked. An executor, not multiprocessing.Pool: a worker that dies at start-up
    # raises BrokenProcessPool here, where a Pool would replace it forever and hang.
    with ProcessPoolExecutor(k, multiprocessing.get_context("spawn"), _init_worker,
                             (train, b.val, str(b.device), threads)) as pool:
        list(pool.map(_one_trial, range(k)))  # warm-up: imports, allocator, kernel caches
        started = time.perf_counter()
        list(pool.map(_one_trial, range(trials)))
        return {"trials_per_min": 60 * trials / (time.perf_counter() - started)}


def bench_trials(b: Bench) -> dict:
    """K concurrent trials (processes) vs one: aggregate trials per minute."""
    k = 16 if b.device.type == "cuda" else max(2, os.cpu_count() or 1)  # 16 on a GPU: the goal is >= 8x
    n = 6_000 if b.quick else 12_000
    trial_train = Split(b.train.images[:n], b.train.labels[:n])
    trials = 2 * k
    results = interleave(
        {"1 process": lambda: concurrent_trials(b, 1, trials, trial_train),
         f"{k} processes": lambda: concurrent_trials(b, k, trials, trial_train)},
        max(1, b.repeats // 2),
    )
    rows = summarise(results, "1 process", "trials_per_min", higher_is_better=True)
    return {"unit": "trials/min", "rows": rows, "trial": f"1 epoch on {len(trial_train.labels):,} images, batch 100",
            "threads_per_process": {"1": threads_per_worker(b, 1), str(k): threads_per_worker(b, k)}}


def needs_tuning(name: str) -> Callable[[Bench], dict]:
    """Benchmarks 4-5 time cnnexp.tuning through benchmarks/tuning_benchmarks.py (`pruning(bench)`,
    `workers(bench)`, each returning {"unit", "rows"})."""

    def run(b: Bench) -> dict:
        from benchmarks import tuning_benchmarks  # Optuna and MLflow, imported only when a study benchmark runs

        return getattr(tuning_benchmarks, name)(b)

    return run


BENCHMARKS: dict[str, Callable[[Bench], dict]] = {
    "epoch": bench_epoch,
    "options": bench_options,  # bf16 / torch.compile: by default only on CUDA (minutes of CPU for a known loss)
    "tracking": bench_tracking,
    "eval": bench_eval,
    "trials": bench_trials,  # K concurrent trials vs one (the GPU-sharing question; workers on CPU)
    "pruning": needs_tuning("pruning"),  # 4. 20-trial study: pruner none vs median vs asha (the default)
    "workers": needs_tuning("workers"),  # 5. trials per minute, workers=1 vs 2
}


# ---------------------------------------------------------------- output


def format_table(report: dict) -> str:
    lines = [f"data: {report['data']}", f"device: {report['device']}  torch threads: {report['torch_threads']}  "
             f"repeats: {report['repeats']}  ({report['note']})", ""]
    lines.append(f"{'benchmark':<10} {'contender':<18} {'median':>10} {'unit':<9} {'min-max':>19} {'vs baseline':>12}")
    for name, result in report["benchmarks"].items():
        if "skipped" in result:
            lines.append(f"{name:<10} skipped: {result['skipped']}")
            continue
        for row in result["rows"]:
            spread = f"{row['min']:.3g}-{row['max']:.3g}"
            ratio = "baseline" if row["contender"] == row["baseline"] else f"{row['ratio_vs_baseline']:.2f}x"
            lines.append(f"{name:<10} {row['contender']:<18} {row['median']:>10.4g} {result['unit']:<9} {spread:>19} {ratio:>12}")
        if "tracking_call_pct_of_epoch" in result:
            lines.append(f"{'':<10} tracking overhead: {result['rows'][1]['overhead_pct']:+.1f}% wall clock; "
                         f"inside log_epoch {result['tracking_call_pct_of_epoch']:.2f}% of an epoch; "
                         f"end-of-run flush {result['flush_s_per_run']:.2f}s once per run")
        for note in result.get("notes", []):  # a benchmark's own summary lines (tuning_benchmarks.py)
            lines.append(f"{'':<10} {note}")
        if "first_epoch_train_loss" in result:
            losses = ", ".join(f"{k} {v:.4f}" for k, v in result["first_epoch_train_loss"].items())
            lines.append(f"{'':<10} first-epoch train loss (same math => close): {losses}")
    return "\n".join(lines)


def write_json(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 repeats on 12,000 images instead of 5 on 60,000")
    parser.add_argument("--only", default="", help=f"comma-separated subset of {','.join(BENCHMARKS)} "
                        "(default: all; `options` only on CUDA)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, auto, ...")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 keeps torch's default)")
    parser.add_argument("--repeats", type=int, default=0, help="override the number of interleaved repeats")
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="directory of real IDX files")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results.json", help="JSON report path")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    bench_device = resolve_device(args.device)
    names = args.only.split(",") if args.only else [n for n in BENCHMARKS if n != "options" or bench_device.type == "cuda"]
    unknown = set(names) - set(BENCHMARKS)
    if unknown:
        raise SystemExit(f"--only: unknown benchmark(s) {', '.join(sorted(unknown))}; choose from {', '.join(BENCHMARKS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    n_train, n_test = (12_000, 2_000) if args.quick else (60_000, 10_000)
    train, val, test, kind = load_data(args.source, n_train, n_test)
    repeats = args.repeats or (2 if args.quick else 5)
    report = {
        "data": kind, "device": str(bench_device), "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
        "repeats": repeats, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "note": "medians of interleaved repeats; min-max shows the noise", "benchmarks": {},
    }
    if bench_device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed batch shapes: autotuned kernels pay after a few steps
    with tempfile.TemporaryDirectory(prefix="cnnexp-tv-") as root:
        bench = Bench(train, val, test, kind, bench_device, repeats, args.quick,
                      write_torchvision_root(Path(root), train, test))
        for name in names:
            started = time.perf_counter()
            report["benchmarks"][name] = BENCHMARKS[name](bench)
            report["benchmarks"][name]["wall_s"] = time.perf_counter() - started
            print(f"[{name} done in {report['benchmarks'][name]['wall_s']:.0f}s]", file=sys.stderr, flush=True)
            write_json(report, args.out)  # after each benchmark, so an interrupted run keeps what it measured
    print(format_table(report))
    print(f"\nJSON: {args.out}")
    return report


if __name__ == "__main__":
    main()
