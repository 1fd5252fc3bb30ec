"""A full disk while train writes its checkpoint or its model: one line saying what is kept, a FAILED run,
and a resume that goes on once there is space."""
import errno

from mlflow.tracking import MlflowClient

from cnnexp.tracking import models
from pipelines import train

ARGS = ["--epochs", "3", "--batch-size", "50"]


def _full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_checkpoint_that_cannot_be_written_stops_the_run_and_resume_goes_on(workdir, idx_source, monkeypatch, capsys):
    real_save = train.save_checkpoint
    monkeypatch.setattr(train, "save_checkpoint", lambda d, p, epoch: _full() if epoch == 2 else real_save(d, p, epoch))
    assert train.cli(ARGS + ["--source", str(idx_source)]) == 1
    (run,) = MlflowClient().search_runs(["0"])
    run_id = run.info.run_id
    line = capsys.readouterr().err.strip()
    assert line == (f"train: error: checkpoint_dir: cannot write epoch 2's checkpoint in checkpoints/{run_id} "
                    f"(No space left on device); epochs 1-1 are kept: free space (or choose another checkpoint_dir), "
                    f"then `cnnexp train --resume {run_id}`")
    assert run.info.status == "FAILED"
    monkeypatch.setattr(train, "save_checkpoint", real_save)
    assert train.cli(["--resume", run_id]) == 0
    assert [m.step for m in MlflowClient().get_metric_history(run_id, "val_accuracy")] == [1, 2, 3]


def test_a_model_that_cannot_be_written_keeps_the_checkpoint_and_resume_logs_it(workdir, idx_source, monkeypatch, capsys):
    real_log = models.log_kept_model
    monkeypatch.setattr(models, "log_kept_model", _full)
    assert train.cli(ARGS + ["--source", str(idx_source)]) == 1
    (run,) = MlflowClient().search_runs(["0"])
    assert "cannot write the model (No space left on device); checkpoints/" in capsys.readouterr().err
    assert (workdir / "checkpoints" / run.info.run_id).is_dir()
    monkeypatch.setattr(models, "log_kept_model", real_log)
    assert train.cli(["--resume", run.info.run_id]) == 0
    assert MlflowClient().get_run(run.info.run_id).outputs.model_outputs
