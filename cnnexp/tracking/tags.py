"""Every tag name cnnexp writes on a run or reads back, in one place (MLflow's own come from mlflow_tags)."""
from __future__ import annotations

# What a run is and where it came from.
ENTRY_POINT = "entry_point"  # cnnexp's own record of the entry point (mlflow run's is mlflow.project.entryPoint)
PROJECT_ENTRY_POINT = "mlflow.project.entryPoint"
RUN_NAME = "mlflow.runName"
NOTE = "mlflow.note.content"
ERROR = "error"  # why a run failed: the exception's type and message
DEVICE = "device"
TORCH_VERSION = "torch_version"
PYTHON_VERSION = "python_version"
DATA_DIGEST = "data_digest"  # the prepared data a run read (evaluate checks it against the training run's)
DATASET = "dataset"  # the dataset it holds (fashion-mnist-sample when a download fell back to the sample)
REUSED_DATA = "reused"  # prepare: an earlier identical preparation was reused

# On the experiment: MLflow's UI (3.17+) opens an experiment of this kind in its model-training view,
# not its GenAI one (traces, agent versions). Set only where the user has set no kind.
EXPERIMENT_KIND = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"

# Who runs it (train): a RUNNING run whose owner is gone can be resumed.
OWNER_HOST = "cnnexp.owner.host"
OWNER_PID = "cnnexp.owner.pid"
HEARTBEAT = "cnnexp.heartbeat"  # unix seconds of its last completed epoch (or start)

# Resuming.
RESUMED_FROM_EPOCH = "resumed_from_epoch"
RESUMED_INTO = "resumed_into"

# main's steps.
STEP = "cnnexp.step"
CODE_VERSION = "cnnexp.code_version"
REUSED_STEPS = "reused_steps"

# evaluate.
SCORED_RUN_ID = "scored_run_id"
SCORED_MODEL_URI = "scored_model_uri"

# A study's parent run and its trials' child runs.
STUDY_STATUS = "study_status"
STUDY_WAITING = "waiting for workers"
STUDY_COMPLETE = "complete"
SETTINGS_FROM_STUDY = "settings_from_study"
STUDY_CALL = "study_call"  # which call of `tune` on the study this parent run is: 1, 2, ...
PREVIOUS_CALL_RUN_ID = "previous_call_run_id"  # the parent run of the call before it
BEST_MODEL_ID = "best_model_id"
TRIAL_NUMBER = "optuna.trial_number"
STUDY_NAME = "optuna.study_name"
PRUNED = "pruned"
PRUNED_AT_EPOCH = "pruned_at_epoch"
INTERRUPTED = "interrupted"
RETRY_OF = "retry_of"
RETRY_OF_RUN_ID = "retry_of_run_id"
