"""The four IDX source files of a dataset, local or downloaded by torchvision: found, read, and checked
(every header, count and label) before anything is split or stored."""
from __future__ import annotations

import gzip
import hashlib
import shutil
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from cnnexp.checks import DataError, first_line

IDX_FILES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}
IDX_MAGIC = {"images": 2051, "labels": 2049}
IMAGE_SHAPE = (28, 28)
NUM_CLASSES = 10
SAMPLE = "fashion-mnist-sample"  # the bundled real sample (cnnexp/sample_data): FashionMNIST's files and classes
TORCHVISION_CLASSES = {"fashion-mnist": "FashionMNIST", "mnist": "MNIST", "kmnist": "KMNIST", SAMPLE: "FashionMNIST"}

@dataclass(frozen=True)
class Split:
    images: torch.Tensor  # uint8 [N, 28, 28]
    labels: torch.Tensor  # int64 [N]

    def __len__(self) -> int:
        return len(self.labels)



# torchvision's names for each dataset's classes (tests/unit/test_idx.py holds them to torchvision's own), so that
# reading local IDX files never imports torchvision: it pulls in torch._dynamo, about 2 s of every prepare.
CLASS_NAMES = {
    "FashionMNIST": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                     "Ankle boot"],
    "MNIST": ["0 - zero", "1 - one", "2 - two", "3 - three", "4 - four", "5 - five", "6 - six", "7 - seven",
              "8 - eight", "9 - nine"],
    "KMNIST": ["o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"],
}


def torchvision_class(dataset: str) -> type:
    """The torchvision dataset that downloads it (imported only to download)."""
    import torchvision.datasets

    return getattr(torchvision.datasets, TORCHVISION_CLASSES[dataset])


def class_names(dataset: str) -> list[str]:
    return list(CLASS_NAMES[TORCHVISION_CLASSES[dataset]])


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def find_source_files(source: Path) -> dict[tuple[str, str], Path]:
    if not source.is_dir():
        raise DataError(f"source: {source} is not a directory holding the four IDX files")
    found = {}
    for key, name in IDX_FILES.items():
        candidates = [source / name, source / f"{name}.gz"]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise DataError(f"{source / name}: missing (expected {name} or {name}.gz)")
        found[key] = path
    return found


def read_idx_bytes(path: Path) -> bytes:
    """The decompressed bytes; gzip is recognised by content, not by name."""
    raw = path.read_bytes()
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as err:
        raise DataError(f"{path}: corrupt or truncated gzip file ({err})") from None


def check_idx_header(path: Path, data: bytes, kind: str) -> int:
    """Checks magic number, shape and length; returns the item count."""
    expected_magic = IDX_MAGIC[kind]
    if len(data) < 8:
        raise DataError(f"{path}: truncated, only {len(data)} bytes")
    magic = struct.unpack(">i", data[:4])[0]
    if magic != expected_magic:
        raise DataError(f"{path}: wrong IDX magic number {magic}, expected {expected_magic} for {kind}")
    ndim = magic & 0xFF
    if len(data) < 4 + 4 * ndim:
        raise DataError(f"{path}: truncated header")
    dims = struct.unpack(f">{ndim}i", data[4 : 4 + 4 * ndim])
    if kind == "images" and tuple(dims[1:]) != IMAGE_SHAPE:
        raise DataError(f"{path}: images are {'x'.join(map(str, dims[1:]))}, expected 28x28")
    expected_len = 4 + 4 * ndim + int(torch.tensor(dims).prod())
    if len(data) != expected_len:
        what = "truncated" if len(data) < expected_len else "has trailing bytes"
        raise DataError(f"{path}: {what}: {len(data)} bytes, header says {expected_len}")
    return dims[0]


def read_source(dataset: str, source: Path) -> tuple[dict[str, Split], dict[str, str]]:
    """Reads train and test after checking each file's header, count and labels; returns splits and sha256s."""
    files = find_source_files(source)
    pixels = IMAGE_SHAPE[0] * IMAGE_SHAPE[1]
    arrays, counts = {}, {}
    for (split, kind), path in files.items():
        data = read_idx_bytes(path)
        counts[(split, kind)] = count = check_idx_header(path, data, kind)
        body = memoryview(data)[len(data) - count * (pixels if kind == "images" else 1):]  # past the checked header
        arrays[(split, kind)] = torch.frombuffer(bytearray(body), dtype=torch.uint8)  # one copy, writable
    splits = {}
    for split in ("train", "test"):
        if counts[(split, "images")] != counts[(split, "labels")]:
            raise DataError(
                f"{files[(split, 'labels')]}: {counts[(split, 'labels')]} labels for "
                f"{counts[(split, 'images')]} images in {files[(split, 'images')].name}"
            )
        images, labels = arrays[(split, "images")], arrays[(split, "labels")]
        splits[split] = Split(images.view(-1, *IMAGE_SHAPE), labels.to(torch.int64))
        check_labels(files[(split, "labels")], splits[split].labels)
    sha256s = {path.name: sha256_file(path) for path in files.values()}
    return splits, sha256s


def check_labels(path: Path, labels: torch.Tensor) -> None:
    if len(labels) == 0:
        raise DataError(f"{path}: holds no labels")
    bad = labels[(labels < 0) | (labels >= NUM_CLASSES)]
    if len(bad):
        raise DataError(f"{path}: label {int(bad[0])} out of range 0-{NUM_CLASSES - 1} ({len(bad)} such labels)")


class DownloadFailed(DataError):
    """A download that was tried and failed; `reason` says why in one line."""

    def __init__(self, dataset: str, reason: str):
        self.reason = reason
        # The same code runs under both front ends, so the line gives the flag in both forms.
        super().__init__(f"download of {dataset} failed ({reason}); without network, pass a directory of the four "
                         f"IDX files as source: `cnnexp prepare --source DIR` (`-P source=DIR` under `mlflow run`)")


def download(dataset: str, into: Path) -> Path:
    """Downloads with torchvision; returns the directory holding the four files."""
    dataset_class = torchvision_class(dataset)
    existed = into.exists()
    try:
        for train in (True, False):
            dataset_class(into, train=train, download=True)
    except Exception as err:  # torchvision raises RuntimeError or URLError depending on the failure
        if not existed:  # half-downloaded files would only mislead the next attempt
            shutil.rmtree(into, ignore_errors=True)
        raise DownloadFailed(dataset, download_reason(err)) from None
    return into / dataset_class.__name__ / "raw"


def download_reason(err: BaseException) -> str:
    """torchvision's download error in one line. Its first line names the file and ends with a colon; the
    lines after it give each mirror's error, and the last one says what went wrong."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):
        return f"{lines[0]} {lines[-1]}"
    return first_line(err)


# --- splitting ------------------------------------------------------------------------------
