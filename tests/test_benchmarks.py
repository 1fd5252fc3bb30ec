import importlib.util
import json
import sys

import pytest
import torch

from conftest import REPO


def _load_run_module():
    spec = importlib.util.spec_from_file_location("bench_run", REPO / "benchmarks" / "run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


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


def test_tuning_benchmarks_run_quick_on_synthetic_data(tmp_path):
    """Benchmarks 4-5 through the real cnnexp.tuning (spawned worker, MLflow child runs) on tiny data."""
    run = _load_run_module()
    out = tmp_path / "results.json"
    threads = torch.get_num_threads()
    run.main(["--quick", "--only", "pruning,workers", "--source", str(tmp_path / "absent"), "--out", str(out)])
    report = json.loads(out.read_text())["benchmarks"]
    pruning, workers = report["pruning"], report["workers"]
    assert pruning["data"].startswith("synthetic") and pruning["same_trials"]
    assert {row["contender"] for row in pruning["rows"]} == {"pruner none", "pruner median"}
    assert pruning["epochs_consumed"]["none"] >= pruning["epochs_consumed"]["median"] > 0
    for key in ("epochs_saved_pct", "study_wall_s", "best_val_accuracy", "best_val_accuracy_drop_points", "target_met"):
        assert key in pruning
    assert {row["contender"] for row in workers["rows"]} == {"workers=1", "workers=2"}
    assert all(row["median"] > 0 for row in workers["rows"])
    for key in ("ratio", "study_wall_s", "worker_startup_s", "ratio_without_startup", "target_met"):
        assert key in workers
    assert torch.get_num_threads() == threads  # run_worker's cores // workers does not leak into the caller
