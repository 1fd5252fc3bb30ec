"""Prepared data: the checked source split into train/validation/test, stored with a manifest, loaded as tensors."""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from cnnexp.config import PrepareConfig
from cnnexp.checks import DataError, check_directory
from cnnexp.errors import unwritable_dir_advice, write_failure
from cnnexp.idx import NUM_CLASSES, SAMPLE, DownloadFailed, Split, class_names, download, read_source, sha256_file
from cnnexp.locks import file_lock

SPLITS = ("train", "val", "test")
SAMPLE_DIR = Path(__file__).resolve().parent / "sample_data"  # see its README.md: origin and license
SAMPLE_OF = {"fashion-mnist": SAMPLE}  # what a failed download of a dataset falls back to
SAMPLE_IMAGES = 4_443  # in sample_data: 3,443 train + 1,000 test
MANIFEST = "manifest.json"
# In <data_dir>/<dataset>/ (which then has no manifest) when the sample stood in for a failed download:
# later runs load the sample, named as what it is, without trying the download again.
STAND_IN = "stand-in.json"
FORMAT_VERSION = 1


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


def prepared_path(data_dir: str | Path, dataset: str) -> Path:
    return Path(data_dir) / dataset


def prepare(config: PrepareConfig) -> tuple[PreparedData, bool]:
    """Reads, checks, splits and stores the data; returns it and whether an earlier result was reused.

    When fashion-mnist cannot be downloaded into the default data_dir, the bundled sample is prepared under
    its own name and stands in for it (the returned data names the sample). In a data_dir the user named,
    a failed download stops instead: an empty directory there is more likely a typo than a wish for 4,443
    images.
    """
    config.validate()
    try:
        return _prepare_dir(config)
    except DownloadFailed as failed:
        if is_prepared(config.data_dir, config.dataset, follow_stand_in=False):
            return load_prepared(config.data_dir, config.dataset), True  # the data it already has stays good
        if config.dataset not in SAMPLE_OF:
            raise
        if config.data_dir != PrepareConfig().data_dir:
            raise DataError(
                f"data_dir: {config.data_dir} holds no prepared {config.dataset} and its download failed "
                f"({failed.reason}); check the path, pass source=<directory of the four IDX files>, or choose "
                f"dataset={SAMPLE_OF[config.dataset]} (the bundled {SAMPLE_IMAGES:,}-image sample)") from None
        sample = _prepare_dir(dataclasses.replace(config, dataset=SAMPLE_OF[config.dataset]))
        _mark_stand_in(prepared_path(config.data_dir, config.dataset), SAMPLE_OF[config.dataset], failed.reason)
        return sample


def _prepare_dir(config: PrepareConfig) -> tuple[PreparedData, bool]:
    target = prepared_path(config.data_dir, config.dataset)
    check_directory("data_dir", str(target.parent))
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
        existing = _read_manifest(target, corrupt_ok=True)  # a corrupt one is what this prepare replaces
        if existing is not None and existing.get("inputs") == inputs:
            with contextlib.suppress(DataError):
                return load_prepared(config.data_dir, config.dataset), True
        train_idx, val_idx = stratified_split(raw_splits["train"].labels, config.val_fraction, config.seed)
        splits = {
            "train": _take(raw_splits["train"], train_idx),
            "val": _take(raw_splits["train"], val_idx),
            "test": raw_splits["test"],
        }
        try:
            _write_atomically(target, splits, inputs, source)
        except (OSError, RuntimeError) as err:  # a full disk, which torch.save reports in words of its own
            if (reason := write_failure(err)) is None:
                raise
            raise RuntimeError(f"data_dir: cannot write the prepared {config.dataset} in {target.parent} ({reason}); "
                               f"{unwritable_dir_advice(err, target.parent, 'data_dir')}, then prepare again") from None
    return load_prepared(config.data_dir, config.dataset), False


def find_source(config: PrepareConfig) -> tuple[Path, str]:
    """The directory of IDX files to read, and the dataset they hold (DownloadFailed when it cannot be had)."""
    if config.source:
        return Path(config.source), config.dataset
    if config.dataset == SAMPLE:
        return SAMPLE_DIR, SAMPLE
    return download(config.dataset, Path(config.data_dir) / "downloads"), config.dataset


def _mark_stand_in(path: Path, held: str, reason: str) -> None:
    """<data_dir>/<dataset>/ becomes just the stand-in note (a sample stored there by an older cnnexp goes:
    it is the bundled one, prepared again under its own name)."""
    with file_lock(path.parent / f".{path.name}.lock"):  # prepare's lock: concurrent fallbacks swap in turn
        new = path.parent / f".{path.name}.tmp-{os.getpid()}-{time.time_ns()}"
        new.mkdir()
        try:
            (new / STAND_IN).write_text(json.dumps({"dataset": held, "download_error": reason}, indent=2))
            _swap_in(new, path)
        finally:
            shutil.rmtree(new, ignore_errors=True)


def _read_stand_in(path: Path) -> dict | None:
    try:
        return json.loads((path / STAND_IN).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def held_dataset(data: PreparedData) -> str:
    """The dataset the prepared data really holds (fashion-mnist-sample where the sample stood in)."""
    return data.manifest["inputs"]["dataset"]


def naming_held(config, data: PreparedData):
    """The config (any with a dataset field) naming the dataset its data holds: what its run logs and a
    study records. Loading by the requested name still finds it (stand-in note)."""
    return dataclasses.replace(config, dataset=held_dataset(data))


def stand_in_notice(data: PreparedData, dataset: str, download_tried: bool) -> str | None:
    """One line when the data loaded for `dataset` is the bundled sample instead, else None: a download
    that failed just now, or the sample that has stood in since an earlier one failed."""
    held = held_dataset(data)
    if held == dataset or held != SAMPLE_OF.get(dataset):
        return None
    images = sum(entry["count"] for entry in data.manifest["splits"].values())
    full_set = "for the full set, prepare again with network or pass source=<directory of the four IDX files>"
    if download_tried:
        reason = (_read_stand_in(prepared_path(data.path.parent, dataset)) or {}).get("download_error", "")
        return (f"{dataset} could not be downloaded{f' ({reason})' if reason else ''}: using the bundled "
                f"{images:,}-image {held} instead, and runs name it {held}; {full_set}")
    return (f"using the bundled {images:,}-image {held}: it stands in for {dataset} in {data.path.parent} since "
            f"its download failed, and runs name it {held}; {full_set}")


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


def _read_manifest(path: Path, corrupt_ok: bool = False) -> dict | None:
    """The manifest of prepared data in path; None where there is none (or, if corrupt_ok, a corrupt one).
    A corrupt one is otherwise refused as such: taking it for missing would start a download instead."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except OSError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        manifest = err
    if isinstance(manifest, dict) and isinstance(manifest.get("splits"), dict):
        return manifest
    if corrupt_ok:
        return None
    reason = f" ({manifest})" if isinstance(manifest, ValueError) else ""
    raise DataError(f"data_dir: {path / MANIFEST} is corrupt{reason}; delete {path} and prepare it again")


def is_prepared(data_dir: str | Path, dataset: str, follow_stand_in: bool = True) -> bool:
    path = prepared_path(data_dir, dataset)
    if _read_manifest(path) is not None:
        return True
    stand_in = _read_stand_in(path) if follow_stand_in else None
    return stand_in is not None and is_prepared(data_dir, stand_in["dataset"], follow_stand_in=False)


def load_prepared(data_dir: str | Path, dataset: str) -> PreparedData:
    """Loads the three splits (the sample's where it stands in), refusing files whose sha256 differs from the manifest."""
    path = prepared_path(data_dir, dataset)
    manifest = _read_manifest(path)
    stand_in = _read_stand_in(path) if manifest is None else None
    if stand_in is not None:
        return load_prepared(data_dir, stand_in["dataset"])
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
