"""An epoch as data: which training rows each member gathers at each step, made once per epoch.

Every step has one shape, [members, batch]: the last partial batch is padded with row 0 and weighted 0,
so a captured step can be replayed for the whole epoch. Each real position weighs 1/len(its batch), so
a member's weighted sum of losses is its own batch's mean loss, the last batch's included.
"""
from __future__ import annotations

import math

import torch


def steps_per_epoch(n: int, batch_size: int) -> int:
    return math.ceil(n / batch_size)


def batch_weights(n: int, batch_size: int) -> torch.Tensor:
    """float [S, b]: 1/len of each step's batch at its real positions, 0 at the padding."""
    steps = steps_per_epoch(n, batch_size)
    position = torch.arange(steps * batch_size).view(steps, batch_size)
    lengths = torch.tensor([min(batch_size, n - s * batch_size) for s in range(steps)], dtype=torch.float32)
    return torch.where(position < n, 1.0 / lengths.unsqueeze(1), 0.0)


def epoch_orders(generators: list[torch.Generator], n: int) -> torch.Tensor:
    """long [K, n]: each member's shuffled order for its next epoch, drawn from its own generator."""
    return torch.stack([torch.randperm(n, generator=g) for g in generators])


def padded_rows(orders: torch.Tensor, batch_size: int) -> torch.Tensor:
    """orders [K, n] -> long [S, K, b]: step s's rows for each member; padding gathers row 0 (weighted 0)."""
    k, n = orders.shape
    steps = steps_per_epoch(n, batch_size)
    padded = torch.zeros(k, steps * batch_size, dtype=orders.dtype)
    padded[:, :n] = orders
    return padded.view(k, steps, batch_size).transpose(0, 1).contiguous()
