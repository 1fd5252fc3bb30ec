"""cnnexp.tuning.workers: the call's trial budget, every started worker's first cohort, no overshoot of a
study's target, and each worker's share of the cores."""
import itertools
import multiprocessing

import mlflow
import torch

from cnnexp.config import PrepareConfig, TuneConfig
from cnnexp.data import prepare
from cnnexp.tuning import workers
from cnnexp.tuning.study import Parent, load_study
from cnnexp.tuning.trials import TrialRunner
from cnnexp.tuning.workers import TrialBudget, first_cohorts, wanted_for_target


class InstantEngine:
    """The engine's interface, each member done with its one epoch as soon as it is asked for."""

    def __init__(self, capacity, train, val, device, **options):
        self.capacity, self.slots, self.ids = capacity, {}, itertools.count()

    @property
    def free(self):
        return self.capacity - len(self.slots)

    def join(self, state, batch_size):
        slot = next(self.ids)
        self.slots[slot] = state
        return slot

    def state(self, slot):
        return self.slots[slot]

    def leave(self, slot):
        return self.slots.pop(slot)

    def epochs(self):
        while self.slots:
            yield {slot: {"epoch": 1, "train_loss": 1.0, "train_accuracy": 0.5, "val_loss": 1.0, "val_accuracy": 0.5,
                          "epoch_time_s": 0.0} for slot in self.slots}


def _claim_all(budget, worker, claimed):
    claimed.put(sum(iter(lambda: budget.claim(worker, 2), 0)))


def test_local_workers_claim_exactly_the_budgeted_trials_between_them():
    context = multiprocessing.get_context("fork")  # the lock and counter are what is tested; fork starts fast
    budget, claimed = TrialBudget(context, 7, first_cohorts(7, 2, 3)), context.Queue()
    processes = [context.Process(target=_claim_all, args=(budget, i, claimed)) for i in range(3)]
    for worker in processes:
        worker.start()
    counts = [claimed.get(timeout=30) for _ in processes]
    for worker in processes:
        worker.join()
    assert sum(counts) == 7 and not budget.claim(0, 2)


def test_a_worker_started_late_still_gets_its_first_cohort():
    budget = TrialBudget(multiprocessing.get_context("fork"), 4, first_cohorts(4, 2, 2))
    assert [budget.claim(0, 2), budget.claim(0, 2)] == [2, 0]  # worker 0 is quick, but cohort 2 is worker 1's
    assert budget.claim(1, 2) == 2
    assert first_cohorts(5, 2, 3) == [2, 2, 1]


def test_a_worker_asks_no_more_trials_than_the_target_lacks_and_builds_no_engine_for_none(workdir, idx_source):
    config = TuneConfig(storage=str(workdir / "journal.log"), cohort=8, epochs=1)
    study = load_study(config)
    for _ in range(3):
        study.ask()  # trials other workers are running
    assert wanted_for_target(study, 4) == 1
    data, _ = prepare(PrepareConfig(source=str(idx_source), data_dir=str(workdir / "data")))
    with mlflow.start_run() as parent:
        # What is tested is how many trials it asks for: members finish their one epoch at once.
        engines = []
        runner = TrialRunner(study, config, data, torch.device("cpu"),
                             Parent(parent.info.run_id, parent.info.experiment_id, mlflow.get_tracking_uri()), [],
                             make_engine=lambda *args, **kwargs: engines.append(InstantEngine(*args)) or engines[-1])
        grant = lambda wanted: min(wanted, wanted_for_target(study, 4))  # noqa: E731
        assert runner.run(8, grant) == 1 and runner.run(8, grant) == 0
        runner.close()
    assert len(engines) == 1  # the second run was granted nothing, so it built no engine
    assert len(study.trials) == 4 and wanted_for_target(study, 4) == 0


def test_workers_share_the_cores_or_the_hosts_share_given_in_omp_num_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(workers, "cpu_cores", lambda: 8)
    assert [workers.threads_per_worker(n) for n in (1, 2, 3, 16)] == [8, 4, 2, 1]
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # one of 4 side-by-side worker processes on 8 cores
    assert [workers.threads_per_worker(n) for n in (1, 2, 4)] == [2, 1, 1]


def test_the_plan_says_how_many_processes_really_start():
    config = TuneConfig(n_trials=4, cohort=4, workers=2, device="cpu")
    assert workers.plan_text(config, None) == "in cohorts of up to 4 on 1 worker process(es) (2 asked: 4 trials fill only 1 cohort(s))"
