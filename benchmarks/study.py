"""Benchmark `study`: a whole `mlflow run . -e tune` against the hand-written study a user would write
(benchmarks/handwritten_tune.py: Optuna TPE + median pruner, MLflow per trial, DataLoader + ToTensor).

Both run as whole processes on the same images, seed after seed (the order alternates); then each side's
best configuration is trained again with the same code on the same prepared split and scored on test.
    python benchmarks/study.py --size small --seeds 0,1,2,3    # the real sample, 12 trials x 3 epochs
    python benchmarks/study.py --size full --seeds 0,1,2,3     # 60,000 tiled images, 8 trials x 2 epochs
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import optuna  # noqa: E402
import torch  # noqa: E402

from benchmarks.harness import DEFAULT_SOURCE, tile, write_torchvision_root  # noqa: E402
from cnnexp.data import Split, load_prepared, read_source  # noqa: E402
from cnnexp.evaluate import predict, score  # noqa: E402
from cnnexp.model import to_inputs  # noqa: E402
from cnnexp.train import fit, new_training_state  # noqa: E402

SIZES = {"small": (None, 12, 3), "full": (60_000, 8, 2)}  # training images (None: the sample's own), trials, epochs


def images(size: str, source: Path) -> tuple[Split, Split]:
    """Train and test images: the real sample as it is, or its training images tiled to 60,000 (never
    its test images, which both sides are scored on)."""
    splits, _ = read_source("fashion-mnist", source)
    train, n_train = splits["train"], SIZES[size][0]
    return (train if n_train is None else tile(train.images, train.labels, n_train)), splits["test"]


def cnnexp_study(work: Path, raw: Path, trials: int, epochs: int, seed: int, extra: list[str]) -> dict:
    params = {"n_trials": trials, "epochs": epochs, "seed": seed, "source": raw, "data_dir": work / "data",
              "storage": work / "journal.log", "study_name": f"bench-{seed}"}
    command = ["mlflow", "run", str(REPO), "-e", "tune", "--env-manager", "local",
               *[arg for k, v in params.items() for arg in ("-P", f"{k}={v}")], *extra]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work}/mlflow.db"}
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"cnnexp tune failed:\n{done.stderr[-3000:]}")
    study = optuna.load_study(study_name=f"bench-{seed}", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(work / "journal.log"))))
    return {"wall_s": wall, "best_value": study.best_value, "best_params": study.best_params}


def handwritten_study(work: Path, root: Path, trials: int, epochs: int, seed: int) -> dict:
    command = [sys.executable, str(REPO / "benchmarks" / "handwritten_tune.py"), str(root), str(trials), str(epochs), str(seed)]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work}/baseline.db"}
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=work)
    wall = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"hand-written study failed:\n{done.stderr[-3000:]}")
    return {"wall_s": wall, **json.loads(done.stdout.strip().splitlines()[-1])}


def test_accuracy(data_dir: Path, params: dict, epochs: int, seed: int) -> float:
    """The configuration trained again on the prepared train split, scored on test: the same for both sides."""
    data = load_prepared(str(data_dir), "fashion-mnist")
    state = new_training_state(params["lr"], seed, torch.device("cpu"))
    fit(state, data.splits["train"], data.splits["val"], batch_size=params["batch_size"], epochs=epochs)
    test = data.splits["test"]
    return score(predict(state.model, to_inputs(test.images)), test.labels)["accuracy"]


def one_seed(size: str, source: Path, seed: int, extra: list[str]) -> dict:
    _, trials, epochs = SIZES[size]
    train, test = images(size, source)
    with tempfile.TemporaryDirectory(prefix="cnnexp-study-bench-") as tmp:
        work = Path(tmp)
        root = write_torchvision_root(work / "tv", train, test)
        raw = root / "FashionMNIST" / "raw"
        sides = {"cnnexp": lambda: cnnexp_study(work, raw, trials, epochs, seed, extra),
                 "hand-written": lambda: handwritten_study(work, root, trials, epochs, seed)}
        order = list(sides) if seed % 2 == 0 else list(reversed(sides))  # alternate who runs first
        results = {name: sides[name]() for name in order}
        for result in results.values():
            result["test_accuracy"] = test_accuracy(work / "data", result["best_params"], epochs, seed)
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=SIZES, default="small")
    parser.add_argument("--seeds", default="0,1,2,3")
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="directory of the real IDX files")
    parser.add_argument("--out", type=Path, default=None, help="JSON report (default: print only)")
    parser.add_argument("-P", dest="params", action="append", default=[], help="extra `mlflow run` -P for cnnexp's side")
    args = parser.parse_args(argv)
    extra = [arg for p in args.params for arg in ("-P", p)]
    per_seed = {}
    for seed in (int(s) for s in args.seeds.split(",")):
        per_seed[seed] = one_seed(args.size, args.source, seed, extra)
        row = per_seed[seed]
        print(f"seed {seed}: " + "  ".join(f"{name} {r['wall_s']:.1f} s, best val {r['best_value']:.4f}, "
                                          f"test {r['test_accuracy']:.4f}" for name, r in row.items()), flush=True)
    summary = {}
    for name in ("cnnexp", "hand-written"):
        summary[name] = {key: statistics.mean(r[name][key] for r in per_seed.values())
                         for key in ("wall_s", "best_value", "test_accuracy")}
    ratio = statistics.mean(r["cnnexp"]["wall_s"] / r["hand-written"]["wall_s"] for r in per_seed.values())
    points = 100 * (summary["cnnexp"]["test_accuracy"] - summary["hand-written"]["test_accuracy"])
    print(f"{args.size}: cnnexp {summary['cnnexp']['wall_s']:.1f} s vs hand-written {summary['hand-written']['wall_s']:.1f} s "
          f"(time ratio {ratio:.2f}); mean test accuracy {summary['cnnexp']['test_accuracy']:.4f} vs "
          f"{summary['hand-written']['test_accuracy']:.4f} ({points:+.2f} points)")
    report = {"size": args.size, "trials_epochs": SIZES[args.size][1:], "extra": extra, "per_seed": per_seed,
              "mean": summary, "time_ratio": ratio, "test_points": points}
    if args.out:
        args.out.write_text(json.dumps(report, indent=2, default=str))
    return report


if __name__ == "__main__":
    main()
