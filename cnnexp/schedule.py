"""An epoch as data: which training rows each member gathers at each step, with what weight, and who steps.

Members of one table train on micro-batches of m rows, m the greatest common divisor of their batch sizes
(their batch size itself when they share one). A member whose batch spans several micro-batches adds up
their gradients and steps when its batch is complete. Every step has one shape, [members, m]: the last
partial batch is padded with row 0 and weighted 0, so a captured step can be replayed for the whole epoch.
Each real position weighs 1/len(its member's batch), so a member's weighted sum of losses over its batch
is that batch's mean loss, the last batch's included.
"""
from __future__ import annotations

import math

import torch


def steps_per_epoch(n: int, batch_size: int) -> int:
    return math.ceil(n / batch_size)


def micro_size(batch_sizes: list[int]) -> int:
    return math.gcd(*batch_sizes)


def batch_weights(n: int, batch_sizes: list[int], micro: int) -> torch.Tensor:
    """float [S, K, m]: 1/len of member j's batch at each real position of micro-batch s, 0 at the padding."""
    steps = steps_per_epoch(n, micro)
    position = torch.arange(steps * micro).view(steps, 1, micro)
    sizes = torch.tensor(batch_sizes).view(1, -1, 1)
    start = position // sizes * sizes
    length = torch.minimum(sizes, n - start).clamp(min=1).to(torch.float32)
    return torch.where(position < n, 1.0 / length, 0.0)


def stepping(n: int, batch_sizes: list[int], micro: int) -> torch.Tensor:
    """bool [S, K]: whether micro-batch s completes member j's batch (the last one always does)."""
    ends = torch.arange(1, steps_per_epoch(n, micro) + 1).view(-1, 1) * micro
    return (ends % torch.tensor(batch_sizes).view(1, -1) == 0) | (ends >= n)


def epoch_orders(generators: list[torch.Generator], n: int) -> torch.Tensor:
    """long [K, n]: each member's shuffled order for its next epoch, drawn from its own generator."""
    return torch.stack([torch.randperm(n, generator=g) for g in generators])


def padded_rows(orders: torch.Tensor, micro: int) -> torch.Tensor:
    """orders [K, n] -> long [S, K, m]: micro-batch s's rows for each member; padding gathers row 0 (weighted 0)."""
    k, n = orders.shape
    steps = steps_per_epoch(n, micro)
    padded = torch.zeros(k, steps * micro, dtype=orders.dtype)
    padded[:, :n] = orders
    return padded.view(k, steps, micro).transpose(0, 1).contiguous()
