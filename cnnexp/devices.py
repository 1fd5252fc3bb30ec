"""Choosing the torch device a user asked for."""
from __future__ import annotations

import torch

from cnnexp.config import ConfigError


def resolve_device(name: str) -> torch.device:
    """auto -> CUDA, then MPS, then CPU; an explicit device that is absent is an error, not a fallback."""
    available = {"cuda": torch.cuda.is_available(), "mps": _mps_available(), "cpu": True}
    if name == "auto":
        return torch.device(next(kind for kind in ("cuda", "mps", "cpu") if available[kind]))
    kind = name.split(":")[0]
    if kind not in available:
        raise ConfigError("device", f"unknown device {name!r}; allowed: auto, cpu, cuda, cuda:N, mps")
    if not available[kind]:
        raise ConfigError("device", f"{name} was asked for but is not available on this machine; use auto or cpu")
    return torch.device(name)


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend and backend.is_available())
