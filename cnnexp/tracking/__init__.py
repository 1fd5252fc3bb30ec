"""Everything that talks to MLflow, one idea a module; callers import the module they need.

- store: the tracking URI, bounded HTTP waits, the up-front check, quiet output
- store_errors: a store that cannot be written (full disk, read-only) as one line, and the runs it left RUNNING
- tags: every tag name the project writes or reads
- runs: a run's life (start, end with the status that happened, child runs, ownership)
- log: params, per-epoch metrics, datasets, tables and figures into a run
- models: the logged model (the flavor), resolving and loading it; pyfunc: its light loader
- registry: registered versions and the champion alias
- queries: compare's table and the reuse of finished steps
- resume: checkpoints and continuing an interrupted train run
- owners: who runs a train run (host, pid, heartbeat), and orphans whose process is gone
- preflight: the MLflow plugin that makes `mlflow run` fail fast on a dead server
- mlflow_private: the one place that leans on MLflow behaviour outside its public API

Nothing is imported here, so that loading a model (cnnexp.tracking.pyfunc) pulls in only what it needs.
"""


def _load_pyfunc(data_path: str, model_config: dict | None = None):
    """Models logged before tracking became a package name `cnnexp.tracking` as their loader. A fresh
    process imports the copy of cnnexp they ship; one that already imported this cnnexp lands here."""
    from cnnexp.tracking.pyfunc import _load_pyfunc as load  # on call only: importing the package stays free

    return load(data_path, model_config)
