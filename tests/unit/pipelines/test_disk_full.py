"""A full disk while train writes its checkpoint or its model: one line saying what is kept, a FAILED run,
and a resume that goes on once there is space; also when torch, not the OS, is what says so.
(A full or read-only tracking store: tests/unit/tracking/test_store_errors.py.)"""
import errno
import io

import pytest
import torch
from mlflow.tracking import MlflowClient

from cnnexp.errors import write_failure
from cnnexp.tracking import models
from pipelines import prepare, train

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
    assert "No space left on device" in run.data.tags["error"]
    monkeypatch.setattr(train, "save_checkpoint", real_save)
    assert train.cli(["--resume", run_id]) == 0
    assert [m.step for m in MlflowClient().get_metric_history(run_id, "val_accuracy")] == [1, 2, 3]
    assert "error" not in MlflowClient().get_run(run_id).data.tags  # FINISHED: the full disk is no longer its story


def test_a_first_checkpoint_that_cannot_be_written_says_nothing_is_kept_and_leaves_no_directory(workdir, idx_source,
                                                                                                 monkeypatch, capsys):
    assert prepare.cli(["--source", str(idx_source)]) == 0  # the data is written before torch.save fails
    monkeypatch.setattr(torch, "save", _full)  # the first write of the first checkpoint: its directory is new
    assert train.cli(ARGS) == 1
    (run,) = [r for r in MlflowClient().search_runs(["0"]) if r.info.run_name.startswith("train-")]
    assert capsys.readouterr().err.strip().endswith("(No space left on device); nothing was kept yet: free space and "
                                                    "train again")
    assert run.info.status == "FAILED" and not (workdir / "checkpoints" / run.info.run_id).exists()


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


def _torch_full(*args, **kwargs):
    """What torch.save raises on a full disk: a RuntimeError ("[enforce fail at inline_container.cc:672] .
    unexpected pos ..."), the OSError only in its context; made by torch itself, writing into a file that
    has room for 100 bytes."""
    class Full(io.RawIOBase):
        written = 0

        def writable(self):
            return True

        def write(self, data):
            if self.written + len(data) > 100:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.written += len(data)
            return len(data)

    torch.save({"weights": torch.zeros(1000)}, Full())


def test_torchs_own_full_disk_error_is_the_documented_checkpoint_line(workdir, idx_source, monkeypatch, capsys):
    with pytest.raises(RuntimeError, match="unexpected pos"):  # what a user saw before: torch's words alone
        _torch_full()
    real_save = train.save_checkpoint
    monkeypatch.setattr(train, "save_checkpoint",
                        lambda d, p, epoch: _torch_full() if epoch == 2 else real_save(d, p, epoch))
    assert train.cli(ARGS + ["--source", str(idx_source)]) == 1
    (run,) = MlflowClient().search_runs(["0"])
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == (f"train: error: checkpoint_dir: cannot write epoch 2's checkpoint in checkpoints/{run.info.run_id} "
                    f"(No space left on device); epochs 1-1 are kept: free space (or choose another checkpoint_dir), "
                    f"then `cnnexp train --resume {run.info.run_id}`")
    assert run.info.status == "FAILED"


def test_a_model_torch_cannot_write_keeps_the_checkpoint(workdir, idx_source, monkeypatch, capsys):
    def torch_cannot_write(*args, **kwargs):
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(models, "log_kept_model", torch_cannot_write)
    assert train.cli(ARGS + ["--source", str(idx_source)]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "cannot write the model (torch could not write the file: PytorchStreamWriter failed writing" in line


def test_other_runtime_errors_are_not_taken_for_a_full_disk():
    assert write_failure(RuntimeError("CUDA out of memory")) is None
    assert write_failure(ValueError("nan loss")) is None
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("wrapped") from None  # a context deliberately cut is not looked into
    except RuntimeError as err:
        assert write_failure(err) is None


def test_a_full_disk_while_preparing_names_data_dir_and_its_disk_not_torchs_words(workdir, idx_source, monkeypatch,
                                                                                  capsys):
    def path_full(obj, path):  # given a path, torch writes from C++: no OSError comes back, only its words
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 768 vs 662")

    monkeypatch.setattr(torch, "save", path_full)
    assert prepare.cli(["--source", str(idx_source)]) == 1
    line = capsys.readouterr().err.strip()
    assert line.startswith("prepare: error: data_dir: cannot write the prepared fashion-mnist in data (torch could not "
                           "write the file: [enforce fail at inline_container.cc:672] . unexpected pos 768 vs 662); "
                           "the disk at /")
    assert " KB free: " in line
    assert line.endswith("free: free space there (or choose another data_dir), then prepare again")
    assert not (workdir / "data" / "fashion-mnist").exists()
