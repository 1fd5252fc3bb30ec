"""cnnexp.tuning.workers: the call's trial budget and each worker's share of the cores."""
import multiprocessing

from cnnexp.tuning import workers
from cnnexp.tuning.workers import TrialBudget


def _claim_all(budget, claimed):
    claimed.put(sum(iter(budget.claim, False)))


def test_local_workers_claim_exactly_the_budgeted_trials_between_them():
    context = multiprocessing.get_context("fork")  # the lock and counter are what is tested; fork starts fast
    budget, claimed = TrialBudget(context, 7), context.Queue()
    processes = [context.Process(target=_claim_all, args=(budget, claimed)) for _ in range(3)]
    for worker in processes:
        worker.start()
    counts = [claimed.get(timeout=30) for _ in processes]
    for worker in processes:
        worker.join()
    assert sum(counts) == 7 and not budget.claim()


def test_workers_share_the_cores_or_the_hosts_share_given_in_omp_num_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(workers, "cpu_cores", lambda: 8)
    assert [workers.threads_per_worker(n) for n in (1, 2, 3, 16)] == [8, 4, 2, 1]
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # one of 4 side-by-side worker processes on 8 cores
    assert [workers.threads_per_worker(n) for n in (1, 2, 4)] == [2, 1, 1]
