"""cnnexp.tuning.counts: a trial stopped and queued again is counted apart from failures and earlier trials."""
import optuna
from optuna.trial import TrialState

from cnnexp.tuning.counts import call_number, earlier_text, plan, running_text, state_counts


def _interrupted_study(stopped: int = 3, complete: int = 1) -> optuna.Study:
    """complete trials, then `stopped` trials failed by Ctrl-C and queued again (as TrialRunner does)."""
    study = optuna.create_study(direction="maximize")
    for _ in range(complete):
        trial = study.ask()
        trial.suggest_float("lr", 1e-3, 1e-1, log=True)
        study.tell(trial, 0.5)
    cohort = [study.ask() for _ in range(stopped + 1)]  # the last one fails for good: nobody retries it
    for trial in cohort:
        trial.suggest_float("lr", 1e-3, 1e-1, log=True)
        study.tell(trial, state=TrialState.FAIL)
    for trial in cohort[:stopped]:  # queued only now: an ask would take a queued trial first
        study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
    return study


def test_requeued_trials_are_neither_failures_nor_earlier_trials_of_their_own():
    study = _interrupted_study()
    counts = state_counts(study)
    assert counts == {"complete": 1, "pruned": 0, "failed": 1, "requeued": 3, "waiting": 3, "running": 0, "total": 8}
    call = plan(study, 5)
    assert (call.earlier, call.queued, call.new) == (5, 3, 2)
    assert earlier_text(call) == "5 earlier trials (1 complete, 1 failed, 3 stopped and queued again)"
    assert running_text(call) == "running 5: 3 queued again, then 2 new"
    assert running_text(plan(study, 2)) == "running 2: 2 queued again, then 0 new (1 stay queued)"


def test_a_call_with_nothing_queued_runs_more():
    study = optuna.create_study()
    assert earlier_text(plan(study, 4)) == "0 earlier trials" and running_text(plan(study, 4)) == "running 4 more"


def test_calls_are_numbered_from_the_study_and_an_older_study_had_one():
    study = optuna.create_study()
    assert call_number(study) == 1
    study.set_user_attr("mlflow_parent_run_id", "abc")  # made before calls were counted
    assert call_number(study) == 2
    study.set_user_attr("tune_calls", 4)
    assert call_number(study) == 5


def test_the_status_text_counts_this_calls_trials_and_names_the_epoch_and_the_best():
    from cnnexp.tuning.counts import done_count, status_text

    study = _interrupted_study(stopped=0, complete=2)  # 2 complete, 1 failed for good
    before = done_count(state_counts(study))
    finished = study.ask()
    study.tell(finished, 0.75)
    running = study.ask()
    running.report(0.4, 1)
    running.report(0.6, 2)
    assert status_text(study, before, 3, 5, 12.4) == \
        "tune: 12 s, 1 of 3 trials done, 1 running (epoch 2 of 5 done), best val_accuracy 0.7500 (trial 3)"
    assert status_text(optuna.create_study(), 0, None, 5, 0) == "tune: 0 s, 0 trials done, 0 running, best val_accuracy -"
