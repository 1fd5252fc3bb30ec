"""cnnexp.tuning.report on a study told by hand: the summary's counts and best, the table's runs, the lines."""
import optuna
import pytest
from optuna.trial import TrialState

from cnnexp.tuning import report


def _study():
    study = optuna.create_study(direction="maximize")
    for number, (state, value, cohort) in enumerate([(TrialState.COMPLETE, 0.8, 0), (TrialState.PRUNED, None, 0),
                                                      (TrialState.FAIL, None, 2), (TrialState.COMPLETE, 0.9, 2)]):
        trial = study.ask()
        trial.suggest_float("lr", 1e-4, 1e-1, log=True)
        trial.suggest_int("log2_batch_size", number + 4, number + 4)  # as cnnexp searches it: 16, 32, 64, 128
        trial.set_user_attr("mlflow_run_id", f"run-{number}")
        trial.set_user_attr("cohort", cohort)
        if state == TrialState.PRUNED:
            trial.report(0.3, 1)
            trial.report(0.4, 2)
        study.tell(trial, value, state=state)
    return study


def test_the_summary_counts_every_state_and_names_the_best():
    result = report.summary(_study())
    assert (result["trials_complete"], result["trials_pruned"], result["trials_failed"], result["trials_total"]) == (2, 1, 1, 4)
    assert result["best_value"] == 0.9 and result["best_trial"] == 3
    assert report.summary_line(result) == "2 complete, 1 pruned, 1 failed; best val_accuracy 0.9000"


def test_the_trials_table_names_each_trials_run_and_cohort():
    table = report.trials_table(_study())
    assert list(table["mlflow_run_id"]) == ["run-0", "run-1", "run-2", "run-3"]
    assert list(table["cohort"]) == [0, 0, 2, 2]


def test_the_trials_table_and_summary_give_batch_size_itself_not_its_exponent():
    study = _study()
    table = report.trials_table(study)
    assert list(table["batch_size"]) == [16, 32, 64, 128]
    assert list(table.columns).index("batch_size") == list(table.columns).index("params_lr") + 1
    assert report.summary(study)["best_params"]["batch_size"] == 128


def test_a_pruned_trials_line_shows_its_last_value_and_epoch():
    study = _study()
    line = report.progress_text(study, study.trials[1])
    assert "val_acc 0.4000  PRUNED at epoch 2  best 0.9000 (trial 3)" in line


def _two_epoch_study(complete: int):
    """`complete` trials over lr and batch_size, each reporting 2 epochs (values spread so importances differ)."""
    study = optuna.create_study(direction="maximize")
    for number in range(complete):
        trial = study.ask()
        lr = trial.suggest_float("lr", 1e-4, 1e-1, log=True)
        trial.suggest_categorical("batch_size", [16, 64, 256])
        trial.report(0.5, 1)
        trial.report(0.6 + lr, 2)
        study.tell(trial, 0.6 + lr + number * 1e-4)
    return study


def _inside_the_figure(fig, labels) -> bool:
    fig.canvas.draw()
    width = fig.bbox.width
    return all(0 <= label.get_window_extent().x0 and label.get_window_extent().x1 <= width for label in labels)


@pytest.mark.study_figures
def test_study_figures_have_whole_epochs_and_trials_and_labels_inside():
    figures = report.figures(_two_epoch_study(5))
    for name in ("intermediate_values.png", "optimization_history.png"):
        ax = figures[name].axes[0]
        figures[name].canvas.draw()
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(t == int(t) for t in ticks), (name, ticks)  # no epoch 1.25
    importances = figures["param_importances.png"]
    labels = importances.axes[0].get_yticklabels()
    assert {label.get_text() for label in labels} == {"lr", "batch_size"}
    assert _inside_the_figure(importances, labels)  # not clipped to "patch_size"


@pytest.mark.study_figures
def test_importances_say_how_many_trials_they_rest_on_and_when_that_is_few():
    few = report.figures(_two_epoch_study(5))["param_importances.png"].axes[0].get_title(loc="left")
    assert "PED-ANOVA over 5 complete trials" in few and "rough guide" in few
    enough = report.figures(_two_epoch_study(report.FEW_FOR_IMPORTANCES))["param_importances.png"]
    title = enough.axes[0].get_title(loc="left")
    assert f"over {report.FEW_FOR_IMPORTANCES} complete trials" in title and "rough guide" not in title


@pytest.mark.study_figures
def test_figures_of_a_one_valued_parameter_bring_no_optuna_log_line_unless_verbose(monkeypatch, caplog):
    study = optuna.create_study(direction="maximize")
    for number in range(3):
        trial = study.ask()
        trial.suggest_float("lr", 1e-4, 1e-1, log=True)
        trial.suggest_categorical("batch_size", [64])  # one batch size in the range
        study.tell(trial, 0.5 + number / 10)
    optuna.logging.enable_propagation()  # Optuna's own handler writes to the stderr it found at import
    try:
        for verbose in ("", "1"):
            monkeypatch.setenv("CNNEXP_VERBOSE", verbose)
            caplog.clear()
            report.figures(study)
            said = [r.getMessage() for r in caplog.records if r.name.startswith("optuna")]
            assert bool([m for m in said if "unique value length is less than 2" in m]) == bool(verbose), said
    finally:
        optuna.logging.disable_propagation()


def test_a_study_in_this_process_starts_its_figure_imports_once_a_trial_ends_not_before(monkeypatch):
    """Started before the first step, the import held the GIL while the engine was set up (benchmarks/startup.py)."""
    started = []
    monkeypatch.setattr(report, "import_figures_in_background", lambda: started.append("import"))
    on_trial_end = report.import_figures_after_first_trial()
    assert started == []
    on_trial_end(None, None)
    on_trial_end(None, None)
    assert started == ["import"]
