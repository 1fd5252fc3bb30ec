"""Benchmark `study`: a whole `mlflow run . -e tune` against the hand-written study a user would write
(benchmarks/handwritten_tune.py: Optuna TPE + median pruner, MLflow per trial, DataLoader + ToTensor).

Both run as whole processes on the same images, seed after seed (the order alternates); then each side's
best configuration is trained again with the same code on the same prepared split and scored on test.
Quality is judged PAIRED: per seed, cnnexp's test accuracy minus the hand-written one's (same seed, same
data), summarised as the mean difference in points with its standard error and a 95% t interval.

The hand-written side does not depend on cnnexp's settings, so its result per (size, trials, epochs,
seed, source) is cached (--cache) and reused across variants; --no-cache runs it again (the timing arm:
a cached side's wall time is the one measured when it was cached).
    python benchmarks/study.py --size small --seeds 0,1,2,3    # the real sample, 12 trials x 3 epochs
    python benchmarks/study.py --size full --seeds 0,1,2,3     # 60,000 tiled images, 8 trials x 2 epochs
    python benchmarks/study.py --seeds 0-11 --variant pruner-median -P pruner=median --out benchmarks/results_quality.json
    python benchmarks/study.py --table benchmarks/results_quality.json   # the variants as a markdown table
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

import scipy.stats

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import optuna  # noqa: E402
import torch  # noqa: E402

from benchmarks.harness import DEFAULT_SOURCE, tile, write_torchvision_root  # noqa: E402
from cnnexp.data import Split, load_prepared, read_source  # noqa: E402
from cnnexp.evaluate import predict, score  # noqa: E402
from cnnexp.model import to_inputs  # noqa: E402
from cnnexp.train import fit, new_training_state  # noqa: E402
from cnnexp.tuning.space import params_of  # noqa: E402

SIZES = {"small": (None, 12, 3), "full": (60_000, 8, 2), "large": (60_000, 30, 5)}  # training images (None: the sample's own), trials, epochs
CACHE = REPO / "benchmarks" / "handwritten_cache.json"
# Test accuracy of a retrained configuration, by (size, source, epochs, seed, lr, batch size): variants that share
# their sampler's start-up trials often pick the same best point, and need not train it again.
RETRAINED = REPO / "benchmarks" / "retrain_cache.json"


def images(size: str, source: Path) -> tuple[Split, Split]:
    """Train and test images: the real sample as it is, or its training images tiled to 60,000 (never
    its test images, which both sides are scored on)."""
    splits, _ = read_source("fashion-mnist", source)
    train, n_train = splits["train"], SIZES[size][0]
    return (train if n_train is None else tile(train.images, train.labels, n_train)), splits["test"]


def cnnexp_study(work: Path, raw: Path, trials: int, epochs: int, seed: int, extra: list[str], repo: Path) -> dict:
    params = {"n_trials": trials, "epochs": epochs, "seed": seed, "source": raw, "data_dir": work / "data",
              "storage": work / "journal.log", "study_name": f"bench-{seed}"}
    command = ["mlflow", "run", str(repo), "-e", "tune", "--env-manager", "local",
               *[arg for k, v in params.items() for arg in ("-P", f"{k}={v}")], *extra]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work}/mlflow.db"}
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"cnnexp tune failed:\n{done.stderr[-3000:]}")
    study = optuna.load_study(study_name=f"bench-{seed}", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(work / "journal.log"))))
    # batch_size, not the exponent Optuna records: the retraining and the pairing read it
    return {"wall_s": wall, "best_value": study.best_value, "best_params": params_of(study.best_trial)}


def handwritten_study(work: Path, root: Path, trials: int, epochs: int, seed: int) -> dict:
    command = [sys.executable, str(REPO / "benchmarks" / "handwritten_tune.py"), str(root), str(trials), str(epochs), str(seed)]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work}/baseline.db"}
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=work)
    wall = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"hand-written study failed:\n{done.stderr[-3000:]}")
    return {"wall_s": wall, **json.loads(done.stdout.strip().splitlines()[-1])}


def test_accuracy(data_dir: Path, params: dict, epochs: int, seed: int, images_key: str) -> float:
    """The configuration trained again on the prepared train split, scored on test: the same for both sides."""
    retrained = json.loads(RETRAINED.read_text()) if RETRAINED.exists() else {}
    key = f"{images_key}:{epochs}:seed{seed}:lr{params['lr']!r}:bs{params['batch_size']}"
    if key not in retrained:
        retrained[key] = retrain(data_dir, params, epochs, seed)
        RETRAINED.write_text(json.dumps(retrained, indent=2))
    return retrained[key]


def retrain(data_dir: Path, params: dict, epochs: int, seed: int) -> float:
    data = load_prepared(str(data_dir), "fashion-mnist")
    state, _ = fit(new_training_state(params["lr"], seed, torch.device("cpu")), data.splits["train"],
                   data.splits["val"], batch_size=params["batch_size"], epochs=epochs)
    test = data.splits["test"]
    return score(predict(state.network(), to_inputs(test.images)), test.labels)["accuracy"]


def cache_key(size: str, source: Path, seed: int) -> str:
    _, trials, epochs = SIZES[size]
    return f"{size}:{trials}x{epochs}:seed{seed}:{source.resolve().name}"


def one_seed(size: str, source: Path, seed: int, extra: list[str], cached: dict | None, repo: Path = REPO) -> dict:
    """Both sides on one seed; the hand-written side's cached result where there is one."""
    _, trials, epochs = SIZES[size]
    train, test = images(size, source)
    with tempfile.TemporaryDirectory(prefix="cnnexp-study-bench-") as tmp:
        work = Path(tmp)
        root = write_torchvision_root(work / "tv", train, test)
        raw = root / "FashionMNIST" / "raw"
        sides = {"cnnexp": lambda: cnnexp_study(work, raw, trials, epochs, seed, extra, repo),
                 "hand-written": lambda: handwritten_study(work, root, trials, epochs, seed)}
        if cached is not None:
            del sides["hand-written"]
        order = list(sides) if seed % 2 == 0 else list(reversed(sides))  # alternate who runs first
        results = {name: sides[name]() for name in order}
        # cnnexp's run prepared work/data (the same split whatever the seed: prepare's own seed is 0).
        for result in results.values():
            result["test_accuracy"] = test_accuracy(work / "data", result["best_params"], epochs, seed, f"{size}:{source.resolve().name}")
    if cached is not None:
        results["hand-written"] = {**cached, "cached": True}
    return results


def mean_se(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else float("nan"))


def paired(per_seed: dict) -> dict:
    """cnnexp minus hand-written test accuracy per seed, in points: mean, standard error, 95% t interval."""
    diffs = [100 * (r["cnnexp"]["test_accuracy"] - r["hand-written"]["test_accuracy"]) for r in per_seed.values()]
    n, (mean, se) = len(diffs), mean_se(diffs)
    half = scipy.stats.t.ppf(0.975, n - 1) * se if n > 1 else float("nan")
    p = 2 * scipy.stats.t.sf(abs(mean / se), n - 1) if n > 1 and se > 0 else float("nan")
    return {"n": n, "mean_points": mean, "se_points": se, "ci95_points": [mean - half, mean + half],
            "p_two_sided": p, "per_seed_points": dict(zip(map(str, per_seed), diffs))}


def table(path: Path, baseline: str = "default") -> str:
    """The variants of a --variant report file as a markdown table. `vs default` pairs each variant with
    the default variant on their common seeds (cnnexp minus cnnexp): both share the sampler's seeds, so
    their start-up trials are the same points and the difference is sharper than against the plain study."""
    variants = json.loads(path.read_text())["variants"]
    rows = ["| variant | `-P` | paired diff vs plain ± SE (points) | 95% t interval | n | vs default ± SE (points) "
            "| seeds whose best config differs from default's | cnnexp wall, mean (median) s | per-seed diffs vs plain (points) |",
            "|---|---|---|---|---|---|---|---|---|"]
    base = variants.get(baseline, {}).get("per_seed", {})
    for name, v in variants.items():
        q = v["paired"]
        params = " ".join(f"`{p}`" for p in v["extra"][1::2]) or "(defaults)"
        seeds = ", ".join(f"{d:+.1f}" for d in q["per_seed_points"].values())
        walls = statistics.median(r["cnnexp"]["wall_s"] for r in v["per_seed"].values())
        common = [s for s in v["per_seed"] if s in base]
        versus, moved = "-", "-"
        if name != baseline and len(common) > 1:
            moved = f"{sum(v['per_seed'][s]['cnnexp']['best_params'] != base[s]['cnnexp']['best_params'] for s in common)}"

            m, se = mean_se([100 * (v["per_seed"][s]["cnnexp"]["test_accuracy"] - base[s]["cnnexp"]["test_accuracy"])
                             for s in common])
            versus = f"{m:+.2f} ± {se:.2f} (n={len(common)})"
        rows.append(f"| {name} | {params} | {q['mean_points']:+.2f} ± {q['se_points']:.2f} | "
                    f"{q['ci95_points'][0]:+.2f} .. {q['ci95_points'][1]:+.2f} | {q['n']} | {versus} | {moved} | "
                    f"{v['mean']['cnnexp']['wall_s']:.1f} ({walls:.1f}) | {seeds} |")
    return "\n".join(rows)


def seeds_of(text: str) -> list[int]:
    """0,1,2 or 0-11 (or both: 0-3,8)."""
    seeds = []
    for part in text.split(","):
        low, _, high = part.partition("-")
        seeds += list(range(int(low), int(high or low) + 1))
    return seeds


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=SIZES, default="small")
    parser.add_argument("--seeds", default="0,1,2,3", help="e.g. 0,1,2,3 or 0-11")
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="directory of the real IDX files")
    parser.add_argument("--out", type=Path, default=None, help="JSON report (default: print only)")
    parser.add_argument("--variant", default="", help="store the report under this name in --out, beside other "
                        "variants (seeds already there are kept; the variant's -P must be the same)")
    parser.add_argument("--cache", type=Path, default=CACHE, help="the hand-written side's results per seed")
    parser.add_argument("--no-cache", action="store_true", help="run the hand-written side again (and re-cache it)")
    parser.add_argument("--table", type=Path, default=None, help="print a --variant report file as a table and exit")
    parser.add_argument("--threads", type=int, default=0, help="torch threads of both sides and of the retraining "
                        "(OMP_NUM_THREADS); 0 leaves them alone. 1 on a shared machine: two threads there wait at "
                        "barriers for descheduled ones (benchmarks/README.md, Threads)")
    parser.add_argument("-P", dest="params", action="append", default=[], help="extra `mlflow run` -P for cnnexp's side")
    parser.add_argument("--repo", type=Path, default=REPO, help="the cnnexp checkout whose `mlflow run` is cnnexp's side "
                        "(another one, e.g. the landed main, for a before/after in turns with this one)")
    args = parser.parse_args(argv)
    if args.table:
        print(table(args.table))
        return {}
    extra = [arg for p in args.params for arg in ("-P", p)]
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # both sides' processes inherit it
        torch.set_num_threads(args.threads)
    stored = json.loads(args.out.read_text()) if args.variant and args.out and args.out.exists() else {"variants": {}}
    previous = stored["variants"].get(args.variant, {})
    if previous and (previous["extra"], previous["size"]) != (extra, args.size):
        raise SystemExit(f"variant {args.variant} was run with {previous['extra']} ({previous['size']}), got {extra}")
    per_seed = previous.get("per_seed", {})
    cache = json.loads(args.cache.read_text()) if args.cache.exists() else {}
    for seed in seeds_of(args.seeds):
        key = cache_key(args.size, args.source, seed)
        row = one_seed(args.size, args.source, seed, extra, None if args.no_cache else cache.get(key), args.repo.resolve())
        row["cnnexp"]["threads"] = torch.get_num_threads()
        row["hand-written"].setdefault("threads", torch.get_num_threads())
        per_seed[str(seed)] = row
        if not row["hand-written"].get("cached"):
            cache[key] = row["hand-written"]
            args.cache.write_text(json.dumps(cache, indent=2, default=str))
        print(f"seed {seed}: " + "  ".join(f"{name} {r['wall_s']:.1f} s{' (cached)' if r.get('cached') else ''}, "
                                          f"best val {r['best_value']:.4f}, test {r['test_accuracy']:.4f}"
                                          for name, r in row.items()), flush=True)
        report = summarise(args.size, extra, per_seed)
        if args.out:  # after every seed, so an interrupted run keeps what finished
            if args.variant:
                stored["variants"][args.variant] = report
                args.out.write_text(json.dumps(stored, indent=2, default=str))
            else:
                args.out.write_text(json.dumps(report, indent=2, default=str))
    q = report["paired"]
    print(f"{args.size}: cnnexp {report['mean']['cnnexp']['wall_s']:.1f} s vs hand-written "
          f"{report['mean']['hand-written']['wall_s']:.1f} s (time ratio {report['time_ratio']:.2f}); paired test accuracy "
          f"difference over {q['n']} seeds {q['mean_points']:+.2f} ± {q['se_points']:.2f} points (SE), 95% t interval "
          f"{q['ci95_points'][0]:+.2f} .. {q['ci95_points'][1]:+.2f}")
    return report


def summarise(size: str, extra: list[str], per_seed: dict) -> dict:
    summary = {}
    for name in ("cnnexp", "hand-written"):
        summary[name] = {key: statistics.mean(r[name][key] for r in per_seed.values())
                         for key in ("wall_s", "best_value", "test_accuracy")}
    ratio = statistics.mean(r["cnnexp"]["wall_s"] / r["hand-written"]["wall_s"] for r in per_seed.values())
    q = paired(per_seed)
    return {"size": size, "trials_epochs": SIZES[size][1:], "extra": extra, "per_seed": per_seed, "mean": summary,
            "time_ratio": ratio, "test_points": q["mean_points"], "paired": q}


if __name__ == "__main__":
    main()
