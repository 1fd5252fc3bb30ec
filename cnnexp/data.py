"""Fashion-MNIST-style IDX data: read through torchvision, check, split, store, load as tensors."""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import shutil
import struct
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from cnnexp.config import PrepareConfig, first_line

IDX_FILES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}
IDX_MAGIC = {"images": 2051, "labels": 2049}
IMAGE_SHAPE = (28, 28)
NUM_CLASSES = 10
SPLITS = ("train", "val", "test")
SAMPLE = "fashion-mnist-sample"
SAMPLE_DIR = Path(__file__).resolve().parent / "sample_data"  # see its README.md: origin and license
SAMPLE_OF = {"fashion-mnist": SAMPLE}  # what a failed download of a dataset falls back to
TORCHVISION_CLASSES = {"fashion-mnist": "FashionMNIST", "mnist": "MNIST", "kmnist": "KMNIST", SAMPLE: "FashionMNIST"}
MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class DataError(RuntimeError):
    """Input data is missing, unreadable or not what it claims to be."""


@dataclass(frozen=True)
class Split:
    images: torch.Tensor  # uint8 [N, 28, 28]
    labels: torch.Tensor  # int64 [N]

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class PreparedData:
    splits: dict[str, Split]
    manifest: dict
    path: Path

    @property
    def digest(self) -> str:
        return self.manifest["digest"]

    @property
    def classes(self) -> list[str]:
        return self.manifest["classes"]


def torchvision_class(dataset: str) -> type:
    # Imported only to read or download IDX files: torchvision pulls in torch._dynamo, seconds of start-up
    # that every tuning worker and `train` (which read the prepared tensors) would otherwise pay.
    import torchvision.datasets

    return getattr(torchvision.datasets, TORCHVISION_CLASSES[dataset])


def class_names(dataset: str) -> list[str]:
    return list(torchvision_class(dataset).classes)


def prepared_path(data_dir: str | Path, dataset: str) -> Path:
    return Path(data_dir) / dataset


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --- reading and checking the four source files -------------------------------------------


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
    """Reads train and test through torchvision after checking each file; returns splits and sha256s."""
    files = find_source_files(source)
    dataset_class = torchvision_class(dataset)
    with tempfile.TemporaryDirectory(prefix="cnnexp-idx-") as root:
        raw_dir = Path(root) / dataset_class.__name__ / "raw"
        raw_dir.mkdir(parents=True)
        counts = {}
        for (split, kind), path in files.items():
            data = read_idx_bytes(path)
            counts[(split, kind)] = check_idx_header(path, data, kind)
            (raw_dir / IDX_FILES[(split, kind)]).write_bytes(data)
        splits = {}
        for split in ("train", "test"):
            if counts[(split, "images")] != counts[(split, "labels")]:
                raise DataError(
                    f"{files[(split, 'labels')]}: {counts[(split, 'labels')]} labels for "
                    f"{counts[(split, 'images')]} images in {files[(split, 'images')].name}"
                )
            ds = dataset_class(root, train=split == "train", download=False)
            splits[split] = Split(ds.data.to(torch.uint8).contiguous(), ds.targets.to(torch.int64))
            check_labels(files[(split, "labels")], splits[split].labels)
    sha256s = {path.name: sha256_file(path) for path in files.values()}
    return splits, sha256s


def check_labels(path: Path, labels: torch.Tensor) -> None:
    if len(labels) == 0:
        raise DataError(f"{path}: holds no labels")
    bad = labels[(labels < 0) | (labels >= NUM_CLASSES)]
    if len(bad):
        raise DataError(f"{path}: label {int(bad[0])} out of range 0-{NUM_CLASSES - 1} ({len(bad)} such labels)")


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
        raise DataError(
            f"download of {dataset} failed ({first_line(err)}); without network, pass a directory of the "
            f"four IDX files: mlflow run . -e prepare --env-manager local -P source=/path/to/idx-dir"
        ) from None
    return into / dataset_class.__name__ / "raw"


# --- splitting ------------------------------------------------------------------------------


def stratified_split(labels: torch.Tensor, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of train and validation, the same fraction of every class held out."""
    generator = torch.Generator().manual_seed(seed)
    train_parts, val_parts = [], []
    for cls in range(NUM_CLASSES):
        members = torch.nonzero(labels == cls).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        n_val = round(len(members) * val_fraction)
        val_parts.append(members[:n_val])
        train_parts.append(members[n_val:])
    train_idx, val_idx = torch.cat(train_parts), torch.cat(val_parts)
    if len(train_idx) == 0 or len(val_idx) == 0:
        raise DataError(f"val_fraction {val_fraction} leaves an empty split of {len(labels)} training images")
    # Class-sorted order would leak into anything that does not shuffle (evaluation batches).
    return train_idx.sort().values, val_idx.sort().values


def per_class_counts(labels: torch.Tensor) -> list[int]:
    return torch.bincount(labels, minlength=NUM_CLASSES).tolist()


# --- storing and loading --------------------------------------------------------------------


def prepare(config: PrepareConfig) -> tuple[PreparedData, bool]:
    """Reads, checks, splits and stores the data; returns it and whether an earlier result was reused."""
    config.validate()
    target = prepared_path(config.data_dir, config.dataset)
    created = _first_missing(target.parent)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"data_dir: cannot create {target.parent} ({err.strerror})") from None
    try:
        return _prepare_in(config, target)
    except BaseException:
        if created is not None:  # a failed prepare leaves no directory behind that it made
            shutil.rmtree(created, ignore_errors=True)
        raise


def _first_missing(path: Path) -> Path | None:
    """The outermost directory of path that does not exist yet (what mkdir(parents=True) would create)."""
    missing = None
    for directory in (path, *path.parents):
        if directory.exists():
            break
        missing = directory
    return missing


def _prepare_in(config: PrepareConfig, target: Path) -> tuple[PreparedData, bool]:
    with file_lock(target.parent / f".{config.dataset}.lock"):
        source, dataset = find_source(config)
        raw_splits, sha256s = read_source(dataset, source)
        inputs = {
            "dataset": dataset,
            "val_fraction": config.val_fraction,
            "seed": config.seed,
            "source_sha256": sha256s,
            "format_version": FORMAT_VERSION,
        }
        existing = _read_manifest(target)
        if existing is not None and existing.get("inputs") == inputs:
            with contextlib.suppress(DataError):
                return load_prepared(config.data_dir, config.dataset), True
        train_idx, val_idx = stratified_split(raw_splits["train"].labels, config.val_fraction, config.seed)
        splits = {
            "train": _take(raw_splits["train"], train_idx),
            "val": _take(raw_splits["train"], val_idx),
            "test": raw_splits["test"],
        }
        _write_atomically(target, splits, inputs, source)
    return load_prepared(config.data_dir, config.dataset), False


def find_source(config: PrepareConfig) -> tuple[Path, str]:
    """The directory of IDX files to read, and the dataset they hold: the bundled sample stands in
    for fashion-mnist when its download fails and no source was given (the manifest then names it)."""
    if config.source:
        return Path(config.source), config.dataset
    if config.dataset == SAMPLE:
        return SAMPLE_DIR, SAMPLE
    try:
        return download(config.dataset, Path(config.data_dir) / "downloads"), config.dataset
    except DataError:
        if config.dataset not in SAMPLE_OF:
            raise
        return SAMPLE_DIR, SAMPLE_OF[config.dataset]


def stand_in_notice(data: PreparedData, dataset: str) -> str | None:
    """One line when the data prepared for `dataset` is the bundled sample instead, else None."""
    held = data.manifest["inputs"]["dataset"]
    if held == dataset or held != SAMPLE_OF.get(dataset):
        return None
    images = sum(entry["count"] for entry in data.manifest["splits"].values())
    return (f"{dataset} could not be downloaded: using the bundled {images:,}-image {held} instead "
            f"(runs are tagged dataset={held}); for the full set, prepare again with network or pass "
            f"source=<directory of the four IDX files>")


def _take(split: Split, idx: torch.Tensor) -> Split:
    return Split(split.images[idx].contiguous(), split.labels[idx].contiguous())


def _write_atomically(target: Path, splits: dict[str, Split], inputs: dict, source: Path) -> None:
    # Not mkdtemp: its mode 0700 would outlive the rename, and others could not read the data; mkdir
    # follows the user's umask. The name is unique enough: prepares of one dataset hold the same lock.
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{time.time_ns()}"
    tmp.mkdir()
    try:
        files = {}
        for name, split in splits.items():
            path = tmp / f"{name}.pt"
            torch.save({"images": split.images, "labels": split.labels.to(torch.uint8)}, path)
            files[name] = {
                "file": path.name,
                "sha256": sha256_file(path),
                "count": len(split),
                "per_class": per_class_counts(split.labels),
            }
        manifest = {
            "inputs": inputs,
            "source": str(source.resolve()),
            "classes": class_names(inputs["dataset"]),
            "splits": files,
            "digest": _digest(files),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        _swap_in(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _swap_in(new: Path, target: Path) -> None:
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / "data")
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _digest(files: dict) -> str:
    joined = "".join(files[name]["sha256"] for name in SPLITS)
    return hashlib.sha256(joined.encode()).hexdigest()[:16]


def _read_manifest(path: Path) -> dict | None:
    try:
        return json.loads((path / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def is_prepared(data_dir: str | Path, dataset: str) -> bool:
    return _read_manifest(prepared_path(data_dir, dataset)) is not None


def load_prepared(data_dir: str | Path, dataset: str) -> PreparedData:
    """Loads the three splits, refusing files whose sha256 differs from the manifest."""
    path = prepared_path(data_dir, dataset)
    manifest = _read_manifest(path)
    if manifest is None:
        raise DataError(f"data_dir: no prepared {dataset} data in {path}; run: mlflow run . -e prepare")
    splits = {}
    for name in SPLITS:
        entry = manifest["splits"][name]
        file = path / entry["file"]
        if not file.is_file() or sha256_file(file) != entry["sha256"]:
            raise DataError(f"{file}: missing or altered since it was prepared; run prepare again")
        stored = torch.load(file, weights_only=True)
        splits[name] = Split(stored["images"], stored["labels"].to(torch.int64))
    return PreparedData(splits, manifest, path)


@contextlib.contextmanager
def file_lock(lock_path: Path):
    """Serialises processes around one path (concurrent prepares of a dataset, creation of a store)."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; concurrent prepares there are the user's to avoid
        yield
        return
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
