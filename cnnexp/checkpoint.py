"""Atomic, verified checkpoints: the last completed epoch survives Ctrl-C, a crash or a kill.

A checkpoint holds a TrainingState in torch's own layout (the Network's state dict and torch.optim.Adam's), so
checkpoints written before the engine, by torch's Adam, still resume, and new ones load into torch's Adam.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from cnnexp.data import sha256_file
from cnnexp.engine import TrainingState
from cnnexp.fused import flatten, parameter_names, unflatten
from cnnexp.slots import BETA1, BETA2, EPS

POINTER = "checkpoint.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, altered or unreadable."""


def capture(state: TrainingState, **extra) -> dict:
    """Everything needed to continue exactly: training state, global RNG states, and the caller's extras."""
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return {"training": to_state_dict(state), "rng": rng, **extra}


def restore(payload: dict, device: torch.device) -> TrainingState:
    """The checkpoint's training state, on device; the global RNG states are set back as they were."""
    torch.set_rng_state(payload["rng"]["torch"])
    if "cuda" in payload["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(payload["rng"]["cuda"])
    return from_state_dict(payload["training"], device)


def to_state_dict(state: TrainingState) -> dict:
    """The state as {"model", "optimizer", "generator", "epoch"}: a Network's and a torch.optim.Adam's state dicts."""
    params = unflatten(state.weights)
    moments = {}
    if state.steps:  # torch's Adam holds no per-parameter state before its first step
        for i, (m, v) in enumerate(zip(unflatten(state.exp_avg).values(), unflatten(state.exp_avg_sq).values())):
            moments[i] = {"step": torch.tensor(float(state.steps)), "exp_avg": m.clone(), "exp_avg_sq": v.clone()}
    group = {"lr": state.lr, "betas": (BETA1, BETA2), "eps": EPS, "weight_decay": 0.0, "amsgrad": False,
             "maximize": False, "params": list(range(len(params)))}
    return {"model": {name: p.clone() for name, p in params.items()},
            "optimizer": {"state": moments, "param_groups": [group]},
            "generator": state.generator.get_state(), "epoch": state.epoch}


def from_state_dict(saved: dict, device: torch.device) -> TrainingState:
    """to_state_dict's inverse, on device; a torch.optim.Adam's state dict reads the same."""
    model, adam = saved["model"], saved["optimizer"]
    names = parameter_names()
    weights = flatten([model[name] for name in names]).to(device)
    moments = [adam["state"][i] for i in range(len(names))] if adam["state"] else []
    exp_avg, exp_avg_sq = ((flatten([m[key] for m in moments]).to(device) if moments else torch.zeros_like(weights))
                           for key in ("exp_avg", "exp_avg_sq"))
    generator = torch.Generator()
    generator.set_state(saved["generator"])
    return TrainingState(weights, exp_avg, exp_avg_sq, int(moments[0]["step"]) if moments else 0, generator,
                         saved["epoch"], adam["param_groups"][0]["lr"])


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
