import importlib
import json
import subprocess
import sys

import pytest
import torch

from cnnexp.config import TuneConfig
from helpers import REPO, subprocess_env, write_idx_dir


def _load_run_module():
    # By a name that the `trials` benchmark's spawned processes can import too (they unpickle its
    # worker functions by module name); run.py keeps the repository on sys.path for them.
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    return importlib.import_module("benchmarks.run")


def test_eval_benchmark_runs_on_synthetic_data_and_writes_json(tmp_path, capsys):
    run = _load_run_module()
    out = tmp_path / "results.json"
    run.main(["--quick", "--only", "eval", "--repeats", "1", "--source", str(tmp_path / "absent"), "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["data"].startswith("synthetic")
    rows = {row["contender"]: row for row in report["benchmarks"]["eval"]["rows"]}
    assert rows["tutorial eval"]["ratio_vs_baseline"] == 1.0 and rows["predict"]["median"] > 0
    assert "predict" in capsys.readouterr().out  # the table


def test_unknown_benchmark_is_refused_and_tuning_ones_are_registered():
    run = _load_run_module()
    assert {"epoch", "tracking", "eval", "trials", "pruning", "workers"} <= set(run.BENCHMARKS)
    with pytest.raises(SystemExit, match="unknown benchmark"):
        run.main(["--only", "nope"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_eval_benchmark_on_cuda(tmp_path):
    run = _load_run_module()
    out = tmp_path / "results.json"
    run.main(["--quick", "--only", "eval", "--repeats", "1", "--device", "cuda", "--out", str(out)])
    assert json.loads(out.read_text())["device"].startswith("cuda")


def test_all_benchmarks_run_quick_in_one_process_on_synthetic_data(tmp_path):
    """All of them in a row, as `run.py` runs them (one must not leave MLflow state that breaks the next);
    4-5 go through the real cnnexp.tuning (spawned worker, MLflow child runs) on tiny data."""
    run = _load_run_module()
    out = tmp_path / "results.json"
    threads = torch.get_num_threads()
    run.main(["--quick", "--repeats", "1", "--source", str(tmp_path / "absent"), "--out", str(out)])
    report = json.loads(out.read_text())["benchmarks"]
    assert list(report) == [name for name in run.BENCHMARKS if name != "options"]  # options: CUDA only by default
    assert not any("skipped" in result for result in report.values())
    pruning, workers = report["pruning"], report["workers"]
    assert pruning["data"].startswith("synthetic") and pruning["same_trials"]
    assert {row["contender"] for row in pruning["rows"]} == {"pruner none", "pruner median", "pruner asha"}
    consumed = pruning["epochs_consumed"]
    assert consumed["none"] >= max(consumed["median"], consumed["asha"]) and min(consumed.values()) > 0
    assert pruning["default_pruner"] == TuneConfig().pruner
    assert pruning["target_met"] == pruning["pruners"][TuneConfig().pruner]["target_met"]
    for key in ("epochs_saved_pct", "study_wall_s", "best_val_accuracy", "best_val_accuracy_drop_points", "target_met"):
        assert all(key in outcome for outcome in pruning["pruners"].values())
    scenarios = ("batch 128", "search space")
    assert {row["contender"] for row in workers["rows"]} == {f"workers={n} ({s})" for n in (1, 2) for s in scenarios}
    assert all(row["median"] > 0 for row in workers["rows"])
    for scenario in scenarios:
        assert {"ratio", "study_wall_s", "target_met"} <= set(workers["scenarios"][scenario])
    assert workers["worker_startup_s"] > 0 and workers["one_process_thread_speedup"]["speedup"] > 0
    assert torch.get_num_threads() == threads  # run_worker's cores // workers does not leak into the caller


def test_engine_benchmark_sets_cohorts_beside_their_separate_fits(tmp_path):
    out = tmp_path / "engine.json"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "engine.py"), "--device", "cpu", "--quick",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {row["contender"]: row for row in json.loads(out.read_text())["rows"]}
    assert {"fit batch 100", "fit batch 1000"} <= set(rows)
    for mode in ("batch 100", "tune's batch mix"):
        for k in (4, 8):
            assert rows[f"{mode}: cohort of {k}"]["speedup_second"] > 0
            assert f"{mode}: cohort of {k}, orders differ" in rows


@pytest.mark.slow  # torch.compile on CPU: a minute
def test_options_benchmark_compares_bf16_and_compile_with_plain_fit(tmp_path):
    run = _load_run_module()
    out = tmp_path / "results.json"
    run.main(["--quick", "--only", "options", "--repeats", "1", "--source", str(tmp_path / "absent"), "--out", str(out)])
    result = json.loads(out.read_text())["benchmarks"]["options"]
    assert [row["contender"] for row in result["rows"]] == ["fit", "fit bf16", "fit compile", "fit bf16+compile"]
    assert all(row["median"] > 0 for row in result["rows"])
    # Each contender's first-epoch extra is reported; not compared, since it is a timing (inductor's on-disk
    # cache and a busy machine both move it) and timings are the benchmark's to measure, not a test's to assert.
    assert set(result["first_epoch_extra_s"]) == {row["contender"] for row in result["rows"]}


def test_startup_stamps_each_phase_of_tune_in_order_up_to_its_first_step(tmp_path):
    """benchmarks/startup.py, which the GPU check runs to find the idle seconds before a study's first step:
    every phase it wraps is still where it looks for it, and reached."""
    source = write_idx_dir(tmp_path / "idx")
    out = tmp_path / "stamps.json"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "startup.py"), "--n-trials", "2", "--epochs", "1",
                           "--source", str(source), "--data-dir", str(tmp_path / "data"), "--out", str(out)],
                          cwd=tmp_path, env=subprocess_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    stamps = json.loads(out.read_text())
    phases = ["tracking store checked", "study opened", "data loaded", "parent run open, settings logged",
              "data on the device"]  # a first capture only on CUDA
    assert list(stamps) == ["interpreter up", "torch imported", "pipelines.tune imported",
                            *(f"{phase}: {end}" for phase in phases for end in ("start", "end")),
                            "first epoch: start", "first step: done"]
    assert list(stamps.values()) == sorted(stamps.values())
    assert "first step: done" in done.stderr and "leaked semaphore" not in done.stderr  # the table, alone
    # Its journal and artifacts went to a scratch directory of its own, removed on exit.
    assert not {"optuna-journal.log", "mlruns"} & {p.name for p in tmp_path.iterdir()}


@pytest.mark.slow
def test_overlap_benchmark_times_the_import_beside_training_steps():
    """benchmarks/overlap.py, the evidence for importing MLflow before the first step: its child measures."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import overlap
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    step_s, import_s, wall_s = overlap.measure("process", steps=2)
    assert 0 < step_s < wall_s and import_s > 0
