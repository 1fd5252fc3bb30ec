import json
import os
import stat
from pathlib import Path

import pytest
import torch

from cnnexp.config import PrepareConfig
from cnnexp.data import SAMPLE, SAMPLE_DIR, DataError, load_prepared, prepare, stratified_split
from helpers import BAD_FILES, REPO, downloads_fail_halfway, offline_downloads


def _prepare(source, data_dir, **kwargs):
    return prepare(PrepareConfig(source=str(source), data_dir=str(data_dir), **kwargs))


def test_prepare_splits_checks_and_records(idx_source, tmp_path):
    data, reused = _prepare(idx_source, tmp_path / "data")
    assert not reused
    counts = {name: len(split) for name, split in data.splits.items()}
    assert counts == {"train": 360, "val": 40, "test": 100}
    assert data.splits["train"].images.dtype == torch.uint8
    manifest = json.loads((data.path / "manifest.json").read_text())
    assert manifest["inputs"]["dataset"] == "fashion-mnist" and manifest["inputs"]["seed"] == 0
    assert set(manifest["inputs"]["source_sha256"]) == {p.name for p in idx_source.iterdir()}
    assert manifest["splits"]["val"]["per_class"] == [4] * 10  # stratified: 10% of 40 per class
    assert manifest["classes"][0] == "T-shirt/top"


def test_prepare_again_with_same_inputs_reuses_and_other_seed_redoes(idx_source, tmp_path):
    first, _ = _prepare(idx_source, tmp_path / "data")
    again, reused = _prepare(idx_source, tmp_path / "data")
    assert reused and again.digest == first.digest
    other, reused = _prepare(idx_source, tmp_path / "data", seed=1)
    assert not reused and other.digest != first.digest


def test_stratified_split_is_seeded_and_disjoint():
    labels = torch.arange(1000) % 10
    train_a, val_a = stratified_split(labels, 0.2, seed=3)
    train_b, val_b = stratified_split(labels, 0.2, seed=3)
    assert torch.equal(val_a, val_b) and torch.equal(train_a, train_b)
    assert len(set(train_a.tolist()) & set(val_a.tolist())) == 0
    assert torch.bincount(labels[val_a]).tolist() == [20] * 10
    assert not torch.equal(stratified_split(labels, 0.2, seed=4)[1], val_a)


@pytest.mark.parametrize("case", BAD_FILES)
def test_a_bad_source_file_leaves_nothing_behind(case, idx_source, tmp_path):
    BAD_FILES[case](idx_source)  # each named in one line: tests/unit/test_idx.py
    data_dir = tmp_path / "data"
    with pytest.raises(DataError):
        _prepare(idx_source, data_dir)
    leftovers = [p.name for p in data_dir.iterdir() if not p.name.endswith(".lock")] if data_dir.exists() else []
    assert leftovers == []


def test_bad_file_does_not_destroy_earlier_prepared_data(idx_source, tmp_path):
    good, _ = _prepare(idx_source, tmp_path / "data")
    BAD_FILES["truncated"](idx_source)
    with pytest.raises(DataError):
        _prepare(idx_source, tmp_path / "data")
    assert load_prepared(tmp_path / "data", "fashion-mnist").digest == good.digest


def test_altered_prepared_file_is_refused(idx_source, tmp_path):
    data, _ = _prepare(idx_source, tmp_path / "data")
    with open(data.path / "val.pt", "ab") as f:
        f.write(b"x")
    with pytest.raises(DataError, match="altered"):
        load_prepared(tmp_path / "data", "fashion-mnist")


def test_a_failed_download_leaves_nothing_behind(tmp_path, monkeypatch):
    downloads_fail_halfway(monkeypatch)
    (tmp_path / "old").mkdir()
    for data_dir in (tmp_path / "new" / "dir", tmp_path / "old"):
        with pytest.raises(DataError, match="download of mnist failed"):
            prepare(PrepareConfig(dataset="mnist", data_dir=str(data_dir)))
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["old", "old/.mnist.lock"]


def test_prepared_data_follows_the_umask(idx_source, tmp_path):
    previous = os.umask(0o022)
    try:
        data, _ = _prepare(idx_source, tmp_path / "data")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(data.path.stat().st_mode) == 0o755
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in data.path.iterdir())


@pytest.mark.parametrize("dataset", ["mnist", "kmnist"])
def test_other_torchvision_datasets_read_the_same_files(dataset, idx_source, tmp_path):
    data, _ = _prepare(idx_source, tmp_path / "data", dataset=dataset)
    assert data.path.name == dataset and len(data.classes) == 10


def test_the_bundled_sample_prepares_as_its_own_dataset(tmp_path):
    data, _ = prepare(PrepareConfig(dataset=SAMPLE, data_dir=str(tmp_path / "data")))
    assert len(data.splits["train"]) + len(data.splits["val"]) == 3443
    assert len(data.splits["test"]) == 1000
    assert data.path.name == SAMPLE and data.classes[0] == "T-shirt/top"


def test_the_bundled_sample_ships_with_the_package_and_says_where_it_comes_from():
    import tomllib

    globs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["cnnexp"]
    shipped = {p.name for pattern in globs for p in (REPO / "cnnexp").glob(pattern)}
    assert shipped == {p.name for p in SAMPLE_DIR.iterdir()}
    notice = (SAMPLE_DIR / "README.md").read_text()
    assert "Zalando Research" in notice and "MIT License" in notice



def test_a_failed_download_into_the_default_data_dir_lets_the_sample_stand_in_under_its_own_name(tmp_path, monkeypatch):
    from cnnexp.data import STAND_IN, is_prepared, naming_held, stand_in_notice

    monkeypatch.chdir(tmp_path)
    attempts = offline_downloads(monkeypatch)
    data, _ = prepare(PrepareConfig())
    assert len(attempts) == 1 and not (tmp_path / "data" / "downloads").exists()
    assert data.path == Path("data") / SAMPLE and data.manifest["inputs"]["dataset"] == SAMPLE
    assert [p.name for p in (tmp_path / "data" / "fashion-mnist").iterdir()] == [STAND_IN]  # no manifest: no data there
    later = load_prepared("data", "fashion-mnist")  # what later runs load, without trying the download
    assert is_prepared("data", "fashion-mnist") and later.digest == data.digest and len(attempts) == 1
    assert naming_held(PrepareConfig(), later).dataset == SAMPLE
    tried = stand_in_notice(data, "fashion-mnist", download_tried=True)
    assert tried.startswith("fashion-mnist could not be downloaded (Error downloading train-images-idx3-ubyte.gz): "
                            "using the bundled 4,443-image fashion-mnist-sample instead")
    standing = stand_in_notice(later, "fashion-mnist", download_tried=False)
    assert "could not be downloaded" not in standing and "stands in for fashion-mnist" in standing
    assert "4,443-image" in standing and "for the full set" in standing
    assert stand_in_notice(data, SAMPLE, download_tried=True) is None


def test_the_sample_count_in_messages_is_the_bundled_samples(tmp_path):
    from cnnexp.data import SAMPLE_IMAGES

    data, _ = prepare(PrepareConfig(dataset=SAMPLE, data_dir=str(tmp_path / "data")))
    assert sum(len(split) for split in data.splits.values()) == SAMPLE_IMAGES


def test_a_failed_download_into_a_named_data_dir_stops_with_one_line(tmp_path, monkeypatch):
    offline_downloads(monkeypatch)
    typo = tmp_path / "dta"
    with pytest.raises(DataError) as raised:
        prepare(PrepareConfig(data_dir=str(typo)))
    assert str(raised.value) == (
        f"data_dir: {typo} holds no prepared fashion-mnist and its download failed (Error downloading "
        "train-images-idx3-ubyte.gz); check the path, pass source=<directory of the four IDX files>, or choose "
        "dataset=fashion-mnist-sample (the bundled 4,443-image sample)")
    assert not typo.exists()  # nothing made there


def test_first_use_of_a_named_data_dir_downloads_into_it(tmp_path, monkeypatch, idx_source):
    import cnnexp.data

    monkeypatch.setattr(cnnexp.data, "download", lambda dataset, into: idx_source)  # the network answered
    data, _ = prepare(PrepareConfig(data_dir=str(tmp_path / "new")))
    assert data.path == tmp_path / "new" / "fashion-mnist" and data.manifest["inputs"]["dataset"] == "fashion-mnist"


def test_prepared_data_is_kept_when_a_later_download_fails(tmp_path, monkeypatch, idx_source):
    import cnnexp.data

    monkeypatch.setattr(cnnexp.data, "download", lambda dataset, into: idx_source)
    first, _ = prepare(PrepareConfig(data_dir=str(tmp_path / "d")))
    monkeypatch.undo()
    offline_downloads(monkeypatch)
    again, reused = prepare(PrepareConfig(data_dir=str(tmp_path / "d")))
    assert reused and again.digest == first.digest and again.manifest["inputs"]["dataset"] == "fashion-mnist"
