"""Which pruner should `tune` default to? Replays full learning curves through each of tune's pruners.

    python benchmarks/pruner_replay.py                  # 8 sampler seeds, 3 minutes on 2 idle cores
    python benchmarks/pruner_replay.py --seeds 0,1 --out /tmp/curves.json

For each seed, 20 random-sampler trials (tune's search space, 5 epochs, training seed 0) are trained
to the end on the real sample, without tracking; then each pruner sees those curves epoch by epoch,
in trial order, as one worker would. A pruner decides only from the values reported so far, so the
replay gives exactly the epochs it would consume and the best trial it would keep, for many seeds at
the cost of one unpruned study each (`run.py --only pruning` measures one seed live, with tracking).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import optuna
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cnnexp.tuning.space import suggest  # noqa: E402
from cnnexp.tuning.study import OBJECTIVE, make_pruner  # noqa: E402
from cnnexp.config import PRUNERS, PrepareConfig, TuneConfig  # noqa: E402
from cnnexp.data import SAMPLE_DIR, PreparedData, prepare  # noqa: E402
from cnnexp.train import fit, new_training_state  # noqa: E402

DEFAULT_SOURCE = SAMPLE_DIR  # the real 4,443-image sample shipped in the package


def learning_curves(data: PreparedData, config: TuneConfig, sampler_seed: int) -> list[list[float]]:
    """Val accuracy after each epoch of every trial of one unpruned random-sampler study."""
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=sampler_seed))
    curves = []
    for _ in range(config.n_trials):
        trial = study.ask()
        params = suggest(trial, config)
        state = new_training_state(params["lr"], config.seed, torch.device("cpu"))
        _, history = fit(state, data.splits["train"], data.splits["val"], batch_size=params["batch_size"],
                      epochs=config.epochs)
        curves.append([epoch[OBJECTIVE] for epoch in history])
        study.tell(trial, curves[-1][-1])
    return curves


def replay(pruner: str, curves: list[list[float]], config: TuneConfig) -> tuple[int, float]:
    """(epochs consumed, best final value kept) had `pruner` watched these curves."""
    # A fixed study name: HyperbandPruner assigns trials to brackets by hashing it.
    study = optuna.create_study(study_name="replay", direction="maximize",
                                pruner=make_pruner(TuneConfig(pruner=pruner, epochs=config.epochs)))
    epochs, best = 0, -1.0
    for curve in curves:
        trial = study.ask()
        for epoch, value in enumerate(curve, 1):
            trial.report(value, epoch)
            epochs += 1
            if epoch < len(curve) and trial.should_prune():  # as tune's objective: never after the last epoch
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                break
        else:
            study.tell(trial, curve[-1])
            best = max(best, curve[-1])
    return epochs, best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2,3,4,5,6,7", help="random-sampler seeds, one study each")
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="directory of the real IDX files")
    parser.add_argument("--out", type=Path, help="also write the learning curves and the table as JSON")
    args = parser.parse_args(argv)
    if not args.source.is_dir():
        raise SystemExit(f"--source: {args.source} not found; this replay needs the real Fashion-MNIST sample")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    config = TuneConfig()
    with tempfile.TemporaryDirectory(prefix="cnnexp-replay-") as tmp:
        data, _ = prepare(PrepareConfig(source=str(args.source), data_dir=tmp))
    seeds = [int(seed) for seed in args.seeds.split(",")]
    curves = {seed: learning_curves(data, config, seed) for seed in seeds}
    print(f"{len(data.splits['train']):,} train / {len(data.splits['val']):,} val images; {config.n_trials} trials "
          f"x {config.epochs} epochs per seed; cells: epochs saved % / best val accuracy points lost")
    print(f"{'pruner':<10}" + "".join(f"{'seed ' + str(seed):>14}" for seed in seeds) + "   saved: min / median")
    table = {}
    for pruner in (p for p in PRUNERS if p != "none"):
        cells = []
        for seed in seeds:
            full = sum(len(curve) for curve in curves[seed])
            epochs, best = replay(pruner, curves[seed], config)
            cells.append((100 * (1 - epochs / full), 100 * (max(c[-1] for c in curves[seed]) - best)))
        table[pruner] = cells
        saved = [cell[0] for cell in cells]
        print(f"{pruner:<10}" + "".join(f"{s:>7.0f}/{d:+5.2f}" for s, d in cells)
              + f"   {min(saved):.0f}% / {statistics.median(saved):.0f}%")
    if args.out:
        args.out.write_text(json.dumps({"seeds": seeds, "curves": curves, "table": table}, indent=1))


if __name__ == "__main__":
    main()
