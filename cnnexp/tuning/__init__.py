"""Everything that talks to Optuna, one idea a module; callers import the module they need.

- study: storage, sampler, pruner, the study's settings and data digest
- space: the search space (batch size through its exponent), and its params as cnnexp reads them
- trials: a worker's trials side by side in one engine, each its own MLflow child run, models logged off the
  training path
- workers: the call's trial budget, devices and threads, worker processes
- recovery: heartbeats, trials whose worker died, retries
- report: the study's summary, trials table and figures on its parent run
- counts: trials counted honestly (a trial queued again is not a failure) and each `tune` call numbered
- optuna_private: the one place that leans on Optuna internals

Every trial is an MLflow child run of the study's run; the run's final status is set before Optuna
records the trial's state, from the same outcome: complete -> FINISHED (once its model is logged),
pruned -> KILLED (tag pruned_at_epoch), exception, non-finite loss or a model that failed to log -> FAILED
(tag error). A trial asked is told, whatever fails or interrupts the runner (Ctrl-C: FAIL, queued again).
"""
