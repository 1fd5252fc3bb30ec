"""K tutorial Networks as one model: every parameter a row of a flat [K, P] buffer, and one forward for all.

What is fused is the work, not the math (HFTA, MLSys 2021): conv1 is one convolution with 6K outputs
(over one shared input, or grouped over K inputs), conv2 a grouped convolution (groups=K), the linear
layers batched matmuls over [K, batch, features]. A member is a row: rows are written, moved and cleared
without changing any other row's numbers. Why each layout was chosen: benchmarks/cohort_refill.md.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from cnnexp.model import Network


@functools.cache
def _meta_network() -> Network:
    with torch.device("meta"):  # no init on the CPU: the global RNG is left as it was
        return Network()


def parameter_names() -> tuple[str, ...]:
    return tuple(name for name, _ in _meta_network().named_parameters())


def parameter_shapes() -> tuple[torch.Size, ...]:
    return tuple(p.shape for p in _meta_network().parameters())


def parameter_count() -> int:
    return sum(math.prod(shape) for shape in parameter_shapes())


def row_views(flat: torch.Tensor) -> list[torch.Tensor]:
    """flat [K, P] as Network's parameters stacked over K ([K, *shape] views of its columns)."""
    views, start = [], 0
    for shape in parameter_shapes():
        stop = start + math.prod(shape)
        views.append(flat[:, start:stop].view(len(flat), *shape))
        start = stop
    return views


def flatten(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One member's parameters (or Adam moments), in Network's order, as one row [P]."""
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def unflatten(row: torch.Tensor) -> dict[str, torch.Tensor]:
    """A row [P] as Network's state dict (views of the row)."""
    return {name: view[0] for name, view in zip(parameter_names(), row_views(row.unsqueeze(0)))}


def fused_forward(stacked: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """x [B, 1, 28, 28] shared by all K members, or [B, K, 28, 28] one image per member -> logits [K, B, classes].

    A module-level function so `torch.compile` can wrap it once for every member count.
    """
    conv1_w, conv1_b, conv2_w, conv2_b, fc1_w, fc1_b, fc2_w, fc2_b, out_w, out_b = stacked
    k, batch = len(conv1_w), len(x)
    if x.device.type == "cpu":
        x = _channels_last_strides(x)
    # Pooling before relu is the same function with the same gradient (relu is monotonic, so it
    # commutes with max) on a quarter of the values.
    t = F.conv2d(x, _as_conv_weight(conv1_w), conv1_b.flatten(), groups=x.shape[1])
    t = F.relu(F.max_pool2d(t, kernel_size=2, stride=2))
    t = F.conv2d(t, _as_conv_weight(conv2_w), conv2_b.flatten(), groups=k)
    t = F.relu(F.max_pool2d(t, kernel_size=2, stride=2))
    # [B, K*12, 4, 4] -> [K, B, 192], each member's features in Network's flatten order (c, h, w).
    t = t.reshape(batch, k, -1).transpose(0, 1)
    t = F.relu(torch.baddbmm(fc1_b.unsqueeze(1), t, fc1_w.transpose(1, 2)))
    t = F.relu(torch.baddbmm(fc2_b.unsqueeze(1), t, fc2_w.transpose(1, 2)))
    return torch.baddbmm(out_b.unsqueeze(1), t, out_w.transpose(1, 2))


def _channels_last_strides(x: torch.Tensor) -> torch.Tensor:
    """The batch with NHWC strides. With one channel NCHW and NHWC hold the same bytes, but only these
    strides make oneDNN write conv1's 6K channels NHWC, where its pooling is 4-5x faster."""
    n, c, h, w = x.shape
    return x.as_strided(x.shape, (c * h * w, 1, w * c, c)) if c == 1 else x.contiguous(memory_format=torch.channels_last)


def _as_conv_weight(stacked: torch.Tensor) -> torch.Tensor:
    """[K, out, in, kh, kw] -> [K*out, in, kh, kw]; channels_last on CPU, where oneDNN's NHWC kernels are faster."""
    weight = stacked.flatten(0, 1)
    return weight.contiguous(memory_format=torch.channels_last) if weight.device.type == "cpu" else weight
