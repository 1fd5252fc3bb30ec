"""The dataset is named truthfully: a run on the bundled sample says so in its params, its model's params
and its study's settings; the download line only when a download was tried; a mistyped data_dir stops."""
import pytest
from mlflow.tracking import MlflowClient

from helpers import offline_downloads, study_of, write_idx_dir
from pipelines import train, tune

SAMPLE = "fashion-mnist-sample"


@pytest.fixture
def offline(monkeypatch) -> list:
    return offline_downloads(monkeypatch)


def _lines(out: str, text: str) -> list[str]:
    return [line for line in out.splitlines() if text in line]


def test_a_run_on_the_stand_in_names_it_and_only_a_real_download_attempt_is_reported(workdir, offline, capsys):
    assert train.cli(["--epochs", "1", "--batch-size", "500"]) == 0
    first = capsys.readouterr().out
    assert len(offline) == 1 and len(_lines(first, "fashion-mnist could not be downloaded (Error downloading")) == 1
    assert train.cli(["--epochs", "1", "--batch-size", "500"]) == 0
    second = capsys.readouterr().out
    assert len(offline) == 1 and not _lines(second, "could not be downloaded")  # nothing was tried again
    assert len(_lines(second, f"using the bundled 4,443-image {SAMPLE}: it stands in for fashion-mnist")) == 1
    client = MlflowClient()
    for run in client.search_runs(["0"]):
        assert run.data.params["dataset"] == SAMPLE and run.data.tags["dataset"] == SAMPLE
        model = client.get_logged_model(run.outputs.model_outputs[-1].model_id)
        assert model.params["dataset"] == SAMPLE


def test_a_source_named_after_the_stand_in_took_over_prepares_the_real_set_as_the_line_advises(workdir, offline,
                                                                                               tmp_path, capsys):
    assert train.cli(["--epochs", "1", "--batch-size", "500"]) == 0
    assert "pass source=<directory of the four IDX files>" in capsys.readouterr().out
    source = write_idx_dir(tmp_path / "idx")
    assert train.cli(["--epochs", "1", "--batch-size", "500", "--source", str(source)]) == 0
    out = capsys.readouterr().out
    assert f"fashion-mnist is only stood in for by the bundled sample in data; preparing it from {source} first" in out
    assert "bundled" not in out.split("first", 1)[1]  # no stand-in line: the run trained on the source's images
    latest = MlflowClient().search_runs(["0"], order_by=["attributes.start_time DESC"])[0]
    assert latest.data.params["dataset"] == latest.data.tags["dataset"] == "fashion-mnist"
    assert train.cli(["--epochs", "1", "--batch-size", "500"]) == 0  # and it stays: no source needed again
    assert "bundled" not in capsys.readouterr().out and len(offline) == 1


def test_a_study_on_the_stand_in_records_it_in_its_settings(workdir, offline):
    assert tune.cli(["--n-trials", "1", "--epochs", "1", "--pruner", "none"]) == 0
    assert study_of(workdir).user_attrs["settings"]["dataset"] == SAMPLE
    runs = MlflowClient().search_runs(["0"])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert parent.data.params["dataset"] == SAMPLE
    assert all(r.data.tags["dataset"] == SAMPLE and r.data.tags["data_digest"] for r in runs)  # parent and trials
    assert tune.cli(["--n-trials", "1", "--epochs", "1", "--pruner", "none"]) == 0  # resumes on the same data
    assert len(offline) == 1 and len(study_of(workdir).trials) == 2


def test_a_mistyped_data_dir_stops_with_one_line_instead_of_training_on_the_sample(workdir, offline, capsys):
    assert train.cli(["--epochs", "1", "--data-dir", "dta"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("train: error: data_dir: dta holds no prepared fashion-mnist and its download failed (Error "
                   "downloading train-images-idx3-ubyte.gz); check the path, pass source=<directory of the four IDX "
                   "files>, or choose dataset=fashion-mnist-sample (the bundled 4,443-image sample)")
    assert not (workdir / "dta").exists()
    assert not MlflowClient().search_runs(["0"])  # refused before its run started: no FAILED run to clean up
