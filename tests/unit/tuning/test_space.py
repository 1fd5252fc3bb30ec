"""cnnexp.tuning.space: batch size searched through its exponent, old categorical studies kept, retries translated."""
import optuna
from mlflow.tracking import MlflowClient
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from cnnexp.config import TuneConfig
from cnnexp.tuning.recovery import queue_retry
from cnnexp.tuning.space import LOG2_BATCH, best_params, optuna_names, params_of, suggest
from helpers import study_of, write_idx_dir
from pipelines import tune

CONFIG = TuneConfig(batch_min=16, batch_max=256)


def _old_study(storage=None, name="old", run_ids=(None, None)) -> optuna.Study:
    """A study as cnnexp made them before the exponent: batch_size a categorical over the sizes."""
    study = optuna.create_study(storage=storage, study_name=name, direction="maximize")
    distributions = {"lr": FloatDistribution(CONFIG.lr_min, CONFIG.lr_max, log=True),
                     "batch_size": CategoricalDistribution(CONFIG.batch_sizes)}
    for (lr, batch_size, value), run_id in zip(((0.01, 64, 0.7), (0.001, 256, 0.6)), run_ids):
        study.add_trial(optuna.trial.create_trial(params={"lr": lr, "batch_size": batch_size}, value=value,
                                                  distributions=distributions, user_attrs={"mlflow_run_id": run_id}))
    return study


def test_a_new_study_searches_the_exponent_as_an_ordered_int_and_reads_back_a_power_of_two():
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    sizes = set()
    for _ in range(12):
        trial = study.ask()
        point = suggest(trial, CONFIG)
        study.tell(trial, 0.5)
        frozen = study.trials[-1]
        assert frozen.distributions[LOG2_BATCH] == IntDistribution(4, 8)
        assert "batch_size" not in frozen.distributions
        assert params_of(frozen) == point and frozen.user_attrs["batch_size"] == point["batch_size"]
        sizes.add(point["batch_size"])
    assert sizes <= set(CONFIG.batch_sizes) and len(sizes) > 1
    assert optuna_names(study) == ["lr", LOG2_BATCH]


def test_a_studys_best_reads_as_lr_and_batch_size_in_either_kind_of_study():
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=1))
    for value in (0.5, 0.9, 0.7):
        trial = study.ask()
        point = suggest(trial, CONFIG)
        study.tell(trial, value)
        if value == 0.9:
            best = point
    assert best_params(study) == best and set(best) == {"lr", "batch_size"}
    assert best_params(_old_study()) == {"lr": 0.01, "batch_size": 64}


def test_an_old_study_keeps_its_categorical_batch_size():
    study = _old_study()
    trial = study.ask()
    point = suggest(trial, CONFIG)
    assert point["batch_size"] in CONFIG.batch_sizes
    assert study.trials[-1].distributions["batch_size"] == CategoricalDistribution(CONFIG.batch_sizes)
    assert LOG2_BATCH not in study.trials[-1].distributions
    assert optuna_names(study) == ["lr", "batch_size"]


def test_a_retry_queued_with_cnnexp_params_repeats_the_point_in_either_kind_of_study():
    for study in (optuna.create_study(direction="maximize"), _old_study()):
        first = study.ask()
        point = suggest(first, CONFIG)
        study.tell(first, state=TrialState.FAIL)
        queue_retry(study, first.number, point, "run-1")
        retry = study.ask()
        assert suggest(retry, CONFIG) == point
        assert retry.user_attrs["retry_of"] == first.number
        assert study.trials[retry.number].params == study.trials[first.number].params


def test_an_old_study_resumes_under_tune_with_its_own_distribution(workdir, tmp_path):
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(workdir / "optuna-journal.log")))
    _old_study(storage, "cnnexp-tune", [MlflowClient().create_run("0").info.run_id for _ in range(2)])
    source = write_idx_dir(tmp_path / "idx", n_train=100, n_test=30)
    args = ["--n-trials", "2", "--epochs", "1", "--batch-min", "16", "--batch-max", "256", "--pruner", "none",
            "--source", str(source)]
    assert tune.cli(args) == 0
    new = study_of(workdir).trials[2:]
    assert len(new) == 2 and all(t.state == TrialState.COMPLETE for t in new)
    assert all(isinstance(t.distributions["batch_size"], CategoricalDistribution) for t in new)
    assert all(LOG2_BATCH not in t.params for t in new)
