"""The entry points in-process: what they record (bad input: tests/test_bad_input.py)."""
from types import SimpleNamespace

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from cnnexp.tracking import log, store
from cnnexp.tracking.runs import run_address
from cnnexp.data import load_prepared
from cnnexp.evaluate import predict, score
from cnnexp.model import to_inputs
from helpers import model_uri, worst_last_epoch, write_idx_dir
from pipelines import cli, evaluate, prepare, train


def _runs():
    return MlflowClient().search_runs(experiment_ids=["0"], order_by=["attributes.start_time ASC"])


def test_prepare_logs_datasets_table_and_samples(workdir, idx_source):
    assert prepare.cli(["--source", str(idx_source)]) == 0
    (run,) = _runs()
    assert run.info.status == "FINISHED"
    assert run.data.params["dataset"] == "fashion-mnist" and run.data.tags["reused"] == "false"
    contexts = sorted(i.tags[0].value for i in run.inputs.dataset_inputs)
    assert contexts == ["test", "train", "val"]
    assert all(i.dataset.digest for i in run.inputs.dataset_inputs)
    artifacts = {a.path for a in MlflowClient().list_artifacts(run.info.run_id)}
    assert {"per_class_counts.json", "samples_per_class.png", "manifest.json"} <= artifacts
    assert prepare.cli(["--source", str(idx_source)]) == 0
    assert _runs()[1].data.tags["reused"] == "true"


def test_train_records_params_epochs_tags_and_a_loadable_model(workdir, idx_source):
    assert train.cli(["--epochs", "2", "--batch-size", "50", "--source", str(idx_source)]) == 0
    (run,) = _runs()
    assert run.info.status == "FINISHED"
    assert run.data.params["lr"] == "0.01" and run.data.params["epochs"] == "2"
    assert {"device", "torch_version", "data_digest"} <= set(run.data.tags)
    client = MlflowClient()
    for metric in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "epoch_time_s"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, metric)] == [1, 2]
    uri = f"runs:/{run.info.run_id}/model"  # MLflow's own address of a run's model loads it
    assert mlflow.get_logged_model(model_uri(run.info.run_id).removeprefix("models:/")).tags["cnnexp.run_name"] == \
        "train-lr0.01-bs50"  # the run's name tells models apart
    images = torch.rand(3, 1, 28, 28)
    logits = mlflow.pytorch.load_model(uri)(images)
    assert logits.shape == (3, 10)
    answer = mlflow.pyfunc.load_model(uri).predict(images.numpy())  # the pyfunc face answers with classes
    assert answer.tolist() == logits.argmax(dim=1).tolist()


def _logged_model(run):
    (output,) = run.outputs.model_outputs
    return mlflow.get_logged_model(output.model_id), output.step


def test_the_logged_model_is_the_kept_epoch_with_its_val_metrics(workdir, idx_source, monkeypatch):
    monkeypatch.setattr(train, "fit", worst_last_epoch(train.fit))
    args = ["--epochs", "3", "--batch-size", "50", "--source", str(idx_source)]
    assert train.cli(args) == 0 and train.cli(args + ["--keep", "last"]) == 0
    best_run, last_run = _runs()
    val = load_prepared("data", "fashion-mnist").splits["val"]
    for run, step in ((best_run, best_run.data.metrics["best_epoch"]), (last_run, 3)):
        model, logged_step = _logged_model(run)
        assert logged_step == step
        (linked,) = [m for m in model.metrics if m.key == "val_accuracy"]
        history = MlflowClient().get_metric_history(run.info.run_id, "val_accuracy")
        assert linked.step == step and [m.value for m in history if m.step == step] == [linked.value]
        network = mlflow.pytorch.load_model(f"models:/{model.model_id}")
        real = score(predict(network, to_inputs(val.images)), val.labels)["accuracy"]
        assert (real == run.data.metrics["best_val_accuracy"]) == (run is best_run)
    assert best_run.data.metrics["best_epoch"] < 3 and last_run.data.metrics["best_epoch"] < 3


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_refused_before_training(workdir, capsys):
    assert train.cli(["--device", "cuda"]) == 2
    assert "device: cuda was asked for but is not available" in capsys.readouterr().err


def test_verbose_shows_the_traceback(workdir, tmp_path, capsys):
    assert train.cli(["--source", str(tmp_path / "nowhere"), "--verbose"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_cnnexp_help_lists_commands_and_unknown_command_fails(capsys):
    assert cli.main(["--help"]) == 0
    assert "train" in capsys.readouterr().out
    assert cli.main(["fly"]) == 2


def test_a_batch_larger_than_the_training_split_says_so_and_trains(workdir, tmp_path, capsys):
    source = write_idx_dir(tmp_path / "idx", n_train=100, n_test=20)
    assert train.cli(["--epochs", "1", "--batch-size", "100000", "--source", str(source)]) == 0
    out = capsys.readouterr().out
    assert "batch_size 100000 is more than the 90 training images: each epoch is a single batch of 90" in out
    (run,) = mlflow.search_runs(output_format="list")
    assert f"run {run.info.run_id}\n" in out  # its id; on a server, its page too (runs.run_address)


def test_a_runs_address_is_its_ui_page_on_a_server_and_nothing_on_a_local_store(monkeypatch):
    run = SimpleNamespace(info=SimpleNamespace(experiment_id="3", run_id="abc"))
    monkeypatch.setattr(store, "tracking_uri", lambda: "http://tuner:pw@host:5000/")
    assert run_address(run) == " at http://tuner:***@host:5000/#/experiments/3/runs/abc?workflowType=machine_learning"
    monkeypatch.setattr(store, "tracking_uri", lambda: "sqlite:///mlflow.db")
    assert run_address(run) == ""


def test_offline_prepare_falls_back_to_the_sample_and_its_run_names_it(workdir, monkeypatch, capsys):
    import torchvision.datasets as tvd

    def no_network(self, *args, **kwargs):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(tvd.FashionMNIST, "download", no_network)
    assert prepare.cli([]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "4,443-image" in line]
    assert len(lines) == 1 and "for the full set" in lines[0]
    (run,) = MlflowClient().search_runs(["0"])
    assert run.data.tags["dataset"] == "fashion-mnist-sample"
    assert {i.dataset.name for i in run.inputs.dataset_inputs} == {f"fashion-mnist-sample-{s}" for s in ("train", "val", "test")}


def _stop_at_epoch_2(real_log_epoch):
    def log_epoch(metrics):
        if metrics["epoch"] == 2:
            raise KeyboardInterrupt
        real_log_epoch(metrics)
    return log_epoch


def test_an_interrupted_run_names_itself_and_its_resume_and_a_short_id_resumes_and_evaluates_it(
        workdir, idx_source, monkeypatch, capsys):
    real_log_epoch = log.log_epoch
    monkeypatch.setattr(log, "log_epoch", _stop_at_epoch_2(real_log_epoch))
    assert train.cli(["--epochs", "2", "--batch-size", "100", "--source", str(idx_source)]) == 130
    (run,) = _runs()
    run_id = run.info.run_id
    assert capsys.readouterr().err.strip() == (f"train: interrupted; the run is marked KILLED (run {run_id}, after "
                                               f"epoch 2); `cnnexp train --resume {run_id}` goes on")
    monkeypatch.setattr(log, "log_epoch", real_log_epoch)
    assert train.cli(["--resume", run_id[:8]]) == 0  # as the UI and the runs table show it
    assert evaluate.cli(["--model-uri", run_id[:8]]) == 0
    assert MlflowClient().get_run(run_id).data.metrics["test_accuracy"] >= 0
