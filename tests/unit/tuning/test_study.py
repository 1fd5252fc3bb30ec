"""cnnexp.tuning.study: storages, settings kept by the study, sampler seeds, the search space."""
import json
import threading

import optuna
import pytest

from cnnexp.config import TuneConfig
from cnnexp.tuning.study import load_study, open_storage, study_settings
from helpers import parent_and_children, points_of, study_of, write_idx_dir
from pipelines import tune


def test_a_study_is_extended_with_its_own_settings_and_a_differing_one_is_refused_before_any_run(
        workdir, tmp_path, capsys):
    source = ["--source", str(write_idx_dir(tmp_path / "idx", n_train=200, n_test=50))]
    assert tune.cli(["--workers", "0", "--n-trials", "2", "--epochs", "2", "--batch-min", "32", *source]) == 0
    capsys.readouterr()
    assert tune.cli(["--workers", "0", "--n-trials", "1", *source]) == 0
    assert "keeps its settings: epochs=2, batch_min=32" in capsys.readouterr().out
    settings = study_of(workdir).user_attrs["settings"]
    assert settings["epochs"] == 2 and settings["batch_min"] == 32
    parents, _ = parent_and_children(workdir)
    assert parents[-1].data.params["epochs"] == "2"
    assert parents[-1].info.status == "RUNNING"  # --workers 0: open until a worker finishes the study
    assert tune.cli(["--workers", "0", "--n-trials", "1", "--epochs", "3", *source]) == 2
    assert "epochs: study 'cnnexp-tune' was created with epochs=2, got 3 (leave it out" in capsys.readouterr().err
    assert len(parent_and_children(workdir)[0]) == 2  # the refused call made no run


def test_a_studys_objective_is_named_for_optunas_tools(tmp_path):
    """optuna-dashboard and Optuna's figures say "Objective 0" for a study with no metric names."""
    config = TuneConfig(storage=str(tmp_path / "journal.log"))
    load_study(config)
    stored = optuna.load_study(study_name=config.study_name, storage=open_storage(config.storage))
    assert stored.metric_names == ["val_accuracy"]


def test_batch_sizes_are_the_powers_of_two_in_range():
    assert TuneConfig(batch_min=16, batch_max=128).batch_sizes == [16, 32, 64, 128]
    assert TuneConfig(batch_min=8, batch_max=8).batch_sizes == [8]


def test_storage_password_never_reaches_the_logs():
    url = "postgresql://tuner:s3cret@db.example:5432/optuna"
    assert "s3cret" not in json.dumps(study_settings(TuneConfig(storage=url)))


def test_a_plain_path_is_a_journal_and_a_url_goes_to_optuna(tmp_path):
    assert isinstance(open_storage(str(tmp_path / "j.log")), optuna.storages.JournalStorage)
    assert isinstance(open_storage(f"sqlite:///{tmp_path / 'x.db'}"), optuna.storages.RDBStorage)


def test_first_calls_on_a_new_sqlite_storage_at_once_all_open_it(tmp_path):
    """Each opener would make the tables; unlocked, 4 at once failed in 4 of 5 tries here ("UNIQUE constraint
    failed: alembic_version.version_num", "table study_directions already exists"). Threads open their own
    lock files, so they exclude each other as processes do."""
    for attempt in range(2):
        url, errors = f"sqlite:///{tmp_path / f'optuna-{attempt}.db'}", []
        start = threading.Barrier(4)

        def first_call():
            start.wait()
            try:
                open_storage(url)
            except Exception as err:  # noqa: BLE001 - collected, asserted below
                errors.append(err)

        threads = [threading.Thread(target=first_call) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_a_resumed_study_proposes_new_points_and_repeats_for_the_same_calls(sampler, workdir, tmp_path):
    source = write_idx_dir(tmp_path / "idx", n_train=100, n_test=30)
    points = {}
    for name in ("first", "again") if sampler == "random" else ("first",):
        for _ in range(2):  # two calls of 2 trials on one study; TPE's are all start-up (random) trials
            args = ["--n-trials", "2", "--epochs", "1", "--sampler", sampler, "--study-name", name,
                    "--pruner", "none", "--source", str(source)]
            assert tune.cli(args) == 0
        points[name] = points_of(study_of(workdir, name))
    assert len(set(points["first"])) == 4  # the second call explored, not replayed
    if sampler == "random":
        assert points["again"] == points["first"]  # the same sequence of calls, the same points


def test_objective_last_makes_a_trials_value_its_last_epochs_and_is_a_study_setting(workdir, tmp_path):
    source = write_idx_dir(tmp_path / "idx", n_train=200, n_test=50)
    args = ["--n-trials", "3", "--epochs", "3", "--cohort", "3", "--sampler", "tpe-multivariate", "--pruner", "none",
            "--objective", "last", "--source", str(source)]
    assert tune.cli(args) == 0
    assert tune.cli(["--n-trials", "1", "--source", str(source)]) == 0  # a resumed study keeps its objective
    study = study_of(workdir)
    assert study.user_attrs["settings"]["objective"] == "last"
    assert [t.value for t in study.trials] == [t.intermediate_values[3] for t in study.trials]
