"""What cnnexp.tuning.optuna_private leans on inside Optuna (5.0.0); a failure here means Optuna moved it."""
import time
import warnings

import optuna
from optuna.trial import TrialState

from cnnexp.tuning.optuna_private import hand_over_user_attrs, record_heartbeat


def test_a_trial_asked_by_hand_beats_and_a_stale_trial_hands_its_edited_user_attrs_to_its_retry(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # heartbeats are experimental in Optuna
        storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'o.db'}", heartbeat_interval=1, grace_period=1)
        study = optuna.create_study(storage=storage)
        trial = study.ask()
    trial.suggest_float("x", 0, 1)
    trial.set_user_attr("worker", {"pid": 1})
    record_heartbeat(study, trial)
    time.sleep(2.5)  # heartbeats are stored to the second: 2.5 s is past the 1 s grace however it rounds
    optuna.storages.fail_stale_trials(study)  # only a trial that has beaten can go stale
    (stale,) = study.trials
    assert stale.state == TrialState.FAIL

    hand_over_user_attrs(stale, retry_of=stale.number, worker=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2)(study, stale)
    (retry,) = study.get_trials(states=(TrialState.WAITING,))
    assert retry.user_attrs["retry_of"] == 0 and "worker" not in retry.user_attrs
