"""Atomic, verified checkpoints: the last completed epoch survives Ctrl-C, a crash or a kill."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from cnnexp.data import sha256_file
from cnnexp.train import TrainingState

POINTER = "checkpoint.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, altered or unreadable."""


def capture(state: TrainingState, **extra) -> dict:
    """Everything needed to continue exactly: training state, global RNG states, and the caller's extras."""
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return {"training": state.state_dict(), "rng": rng, **extra}


def restore(state: TrainingState, payload: dict) -> None:
    state.load_state_dict(payload["training"])
    torch.set_rng_state(payload["rng"]["torch"])
    if "cuda" in payload["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(payload["rng"]["cuda"])


def save_checkpoint(directory: Path, payload: dict, epoch: int) -> Path:
    """Writes epoch-N.pt, then a pointer holding its sha256: a kill at any moment leaves a consistent pair.
    A first checkpoint that cannot be written (a full disk) leaves no empty directory behind."""
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"epoch-{epoch:04d}.pt"
    try:
        _write_atomically(path, lambda f: torch.save(payload, f))
        pointer = {"file": path.name, "sha256": sha256_file(path), "epoch": epoch}
        _write_atomically(directory / POINTER, lambda f: f.write(json.dumps(pointer).encode()))
    except BaseException:
        if created:
            shutil.rmtree(directory, ignore_errors=True)  # nothing in it was whole yet
        raise
    for old in directory.glob("epoch-*.pt"):
        if old != path:
            old.unlink(missing_ok=True)
    return path


def has_checkpoint(directory: Path) -> bool:
    return (directory / POINTER).is_file()


def load_checkpoint(directory: Path) -> dict:
    """Loads the newest checkpoint (tensors on the CPU) after checking its sha256."""
    try:
        pointer = json.loads((directory / POINTER).read_text())
        file = directory / pointer["file"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{directory / POINTER}: unreadable checkpoint pointer ({err})") from None
    if not file.is_file() or sha256_file(file) != pointer["sha256"]:
        raise CheckpointError(f"{file}: missing or altered since it was written; refusing to resume from it")
    # The RNG states must stay CPU tensors; load_state_dict moves model and optimizer to their device.
    return torch.load(file, map_location="cpu", weights_only=True)


def _write_atomically(path: Path, write: Callable) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
