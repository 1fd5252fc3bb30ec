"""cnnexp.idx: the four IDX files found, read (gzipped or not), checked file by file, and downloaded."""
import gzip
import subprocess
import sys

import numpy as np
import pytest
import torch

from cnnexp.checks import DataError
from cnnexp.idx import (DownloadFailed, check_idx_header, class_names, download, find_source_files, read_idx_bytes,
                        read_source, torchvision_class)
from helpers import BAD_FILES, EXPECTED_FILE, downloads_fail_halfway, idx_bytes, synthetic_split, write_idx_dir


def test_read_source_gives_the_files_images_and_labels_and_their_sha256s(idx_source):
    splits, sha256s = read_source("fashion-mnist", idx_source)
    images, labels = synthetic_split(400, 1)  # what write_idx_dir wrote for train
    assert torch.equal(splits["train"].images, torch.from_numpy(images)) and splits["train"].images.dtype == torch.uint8
    assert torch.equal(splits["train"].labels, torch.from_numpy(labels).long())
    assert len(splits["test"]) == 100
    assert set(sha256s) == {p.name for p in idx_source.iterdir()} and all(len(h) == 64 for h in sha256s.values())


def test_uncompressed_and_gzipped_files_give_the_same_data(tmp_path):
    (gz, _), (raw, _) = (read_source("fashion-mnist", write_idx_dir(tmp_path / name, gz=name == "gz"))
                         for name in ("gz", "raw"))
    for split in ("train", "test"):
        assert torch.equal(gz[split].images, raw[split].images) and torch.equal(gz[split].labels, raw[split].labels)


def test_gzip_is_recognised_by_content_not_by_name(tmp_path):
    data = idx_bytes(np.zeros(3))
    (tmp_path / "plain.gz").write_bytes(data)  # named .gz, not compressed
    (tmp_path / "packed").write_bytes(gzip.compress(data))  # compressed, named plainly
    assert read_idx_bytes(tmp_path / "plain.gz") == read_idx_bytes(tmp_path / "packed") == data


def test_the_header_gives_the_count_and_trailing_bytes_are_refused(tmp_path):
    data = idx_bytes(np.zeros((5, 28, 28)))
    assert check_idx_header(tmp_path / "f", data, "images") == 5
    with pytest.raises(DataError, match="has trailing bytes"):
        check_idx_header(tmp_path / "f", data + b"\0", "images")
    with pytest.raises(DataError, match="truncated, only 3 bytes"):
        check_idx_header(tmp_path / "f", data[:3], "images")


def test_an_uncompressed_file_is_preferred_where_both_are_present(idx_source):
    (idx_source / "train-images-idx3-ubyte").write_bytes(gzip.decompress((idx_source / "train-images-idx3-ubyte.gz").read_bytes()))
    assert find_source_files(idx_source)[("train", "images")].name == "train-images-idx3-ubyte"
    assert find_source_files(idx_source)[("train", "labels")].name == "train-labels-idx1-ubyte.gz"


@pytest.mark.parametrize("case", BAD_FILES)
def test_a_bad_source_file_is_named_in_one_line(case, idx_source):
    BAD_FILES[case](idx_source)
    with pytest.raises(DataError) as err:
        read_source("fashion-mnist", idx_source)
    assert EXPECTED_FILE[case] in str(err.value) and "\n" not in str(err.value)


def test_a_source_that_is_not_a_directory_is_named(tmp_path):
    with pytest.raises(DataError, match="is not a directory holding the four IDX files"):
        find_source_files(tmp_path / "nowhere")


def test_each_dataset_has_its_own_class_names():
    assert class_names("fashion-mnist")[0] == "T-shirt/top" and class_names("fashion-mnist-sample")[9] == "Ankle boot"
    assert class_names("mnist")[0].startswith("0") and len(class_names("kmnist")) == 10


@pytest.mark.parametrize("dataset", ["fashion-mnist", "mnist", "kmnist", "fashion-mnist-sample"])
def test_class_names_are_torchvisions(dataset):
    assert class_names(dataset) == list(torchvision_class(dataset).classes)


def test_reading_a_source_does_not_import_torchvision(tmp_path):
    # In a fresh interpreter: torchvision (and the torch._dynamo it imports) is seconds of every prepare.
    source = write_idx_dir(tmp_path / "idx", n_train=30, n_test=10)
    code = (f"import sys; from pathlib import Path; from cnnexp.idx import read_source\n"
            f"splits, _ = read_source('mnist', Path({str(source)!r}))\n"
            f"print(len(splits['train']), len(splits['test']), 'torchvision' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["30", "10", "False"], done.stderr[-2000:]


def test_failed_download_says_so_and_shows_source(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    def no_network(self, *args, **kwargs):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(tvd.MNIST, "download", no_network)
    with pytest.raises(DownloadFailed, match=r"download of mnist failed.*as source: `cnnexp prepare --source DIR` \(`-P source=DIR` under `mlflow run`\)") as raised:
        download("mnist", tmp_path / "downloads")
    assert raised.value.reason == "Error downloading train-images-idx3-ubyte.gz"


def test_torchvisions_download_error_is_one_line_with_the_file_and_what_went_wrong(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    def no_network(self, *args, **kwargs):  # torchvision's own message: the file, then each mirror's error
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried https://a/, got:\n<urlopen error "
                           "[Errno -3] Temporary failure in name resolution>\nTried https://b/, got:\n<urlopen error "
                           "[Errno -2] Name or service not known>\n")

    monkeypatch.setattr(tvd.MNIST, "download", no_network)
    with pytest.raises(DownloadFailed) as raised:
        download("mnist", tmp_path / "downloads")
    assert raised.value.reason == ("Error downloading train-images-idx3-ubyte.gz: <urlopen error [Errno -2] Name or "
                                   "service not known>")


def test_a_failed_download_removes_the_directory_it_made_and_keeps_one_that_was_there(tmp_path, monkeypatch):
    downloads_fail_halfway(monkeypatch)
    with pytest.raises(DownloadFailed):
        download("mnist", tmp_path / "new")
    assert not (tmp_path / "new").exists()  # half-downloaded files would only mislead the next attempt
    (tmp_path / "old").mkdir()
    with pytest.raises(DownloadFailed):
        download("mnist", tmp_path / "old")
    assert (tmp_path / "old").is_dir()
