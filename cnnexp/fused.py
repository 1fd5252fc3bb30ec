"""K tutorial Networks as one model: every parameter and Adam moment stacked on a leading member dim.

What is fused is the work, not the math (HFTA, MLSys 2021): conv1 is one convolution with 6K outputs
(over one shared input, or grouped over K inputs), conv2 a grouped convolution (groups=K), the linear
layers batched matmuls over [K, batch, features], and one Adam update with one lr and step count per
member runs over the stacked rows. A member is a row: rows are selected, written back, dropped and
appended (`Fused`) without changing any other row's numbers.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cnnexp.model import Network

# torch.optim.Adam's defaults, which `fit` uses.
BETA1, BETA2, EPS = 0.9, 0.999, 1e-8


@functools.cache
def parameter_names() -> tuple[str, ...]:
    with torch.device("meta"):  # no init on the CPU: the global RNG is left as it was
        return tuple(name for name, _ in Network().named_parameters())


def fused_forward(stacked: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """x [B, 1, 28, 28] shared by all K members, or [B, K, 28, 28] one image per member -> logits [K, B, classes].

    A module-level function so `torch.compile` can wrap it once for every cohort size.
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
    strides make oneDNN write conv1's 6K channels NHWC, where its pooling is 4-5x faster (conv1 + pool1
    of a K=16, batch-100 step: 49 ms -> 13 ms on one thread)."""
    n, c, h, w = x.shape
    return x.as_strided(x.shape, (c * h * w, 1, w * c, c)) if c == 1 else x.contiguous(memory_format=torch.channels_last)


def _as_conv_weight(stacked: torch.Tensor) -> torch.Tensor:
    """[K, out, in, kh, kw] -> [K*out, in, kh, kw]; channels_last on CPU, where oneDNN's NHWC kernels are faster."""
    weight = stacked.flatten(0, 1)
    return weight.contiguous(memory_format=torch.channels_last) if weight.device.type == "cpu" else weight


class FusedNetworks(nn.Module):
    """K Networks' parameters, each stacked over the members on a leading dim, in Network's order."""

    def __init__(self, stacked: list[torch.Tensor]):
        super().__init__()
        self.stacked = nn.ParameterList(nn.Parameter(t.contiguous()) for t in stacked)

    @classmethod
    def of(cls, networks: list[Network]) -> FusedNetworks:
        params = [dict(n.named_parameters()) for n in networks]
        return cls([torch.stack([p[name].detach() for p in params]) for name in parameter_names()])

    @property
    def k(self) -> int:
        return len(self.stacked[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused_forward(list(self.stacked), x)

    def weights(self, index: int) -> dict[str, torch.Tensor]:
        """Member `index`'s slice of the fused weights, by Network's parameter names (views, not copies)."""
        return {name: p[index].detach() for name, p in zip(parameter_names(), self.stacked)}

    def member(self, index: int) -> Network:
        """Member `index` as a plain Network (a copy of its slice of the fused weights)."""
        network = Network(num_classes=self.stacked[-1].shape[1]).to(self.stacked[0].device)
        network.load_state_dict(self.weights(index))  # load_state_dict copies
        return network


class CohortAdam:
    """torch.optim.Adam (default betas and eps, no weight decay) over stacked parameters: one lr and one
    step count per member, and an update of only the rows whose batch is complete."""

    def __init__(self, params: list[nn.Parameter], lr: torch.Tensor, steps: torch.Tensor,
                 exp_avg: list[torch.Tensor], exp_avg_sq: list[torch.Tensor]):
        self.params, self.lr, self.steps = list(params), lr, steps  # lr, steps: float64 [K]
        self.exp_avg, self.exp_avg_sq = exp_avg, exp_avg_sq

    def step(self, rows: torch.Tensor | None = None) -> None:
        """rows: the members whose batch is complete (long [R]); None = every member.

        Only those rows are read and written: at tune's batch mix most micro-batches step a few members
        (index_select vs masked math over all rows: benchmarks/cohort_refill.md).
        """
        with torch.no_grad():
            if rows is None:
                self.steps += 1
                steps, lr = self.steps, self.lr
            else:
                self.steps[rows] += 1
                steps, lr = self.steps[rows], self.lr[rows]
            # Bias corrections in float64, as Adam computes them from its step count.
            step_size = (lr / (1 - BETA1**steps)).float()
            correction2_sqrt = (1 - BETA2**steps).sqrt().float()
            for p, m_all, v_all in zip(self.params, self.exp_avg, self.exp_avg_sq):
                shape = (-1,) + (1,) * (p.dim() - 1)
                if rows is None:
                    w, g, m, v = p.data, p.grad, m_all, v_all
                else:
                    w, g, m, v = (t.index_select(0, rows) for t in (p.data, p.grad, m_all, v_all))
                m.lerp_(g, 1 - BETA1)
                v.mul_(BETA2).addcmul_(g, g, value=1 - BETA2)
                denom = (v.sqrt() / correction2_sqrt.view(shape)).add_(EPS)
                w.sub_(step_size.view(shape) * m / denom)
                if rows is not None:
                    for whole, part in ((p.data, w), (m_all, m), (v_all, v)):
                        whole.index_copy_(0, rows, part)

    def zero_grad(self, rows: torch.Tensor | None = None) -> None:
        """Clears the gradients of the members that stepped; the others keep accumulating."""
        for p in self.params:
            if rows is None:
                p.grad = None
            elif p.grad is not None:
                p.grad.index_fill_(0, rows, 0)


@dataclass
class Fused:
    """The fused model and its optimizer: every tensor in them has one row per member."""

    model: FusedNetworks
    optimizer: CohortAdam

    @classmethod
    def new(cls, networks: list[Network], lrs: list[float]) -> Fused:
        model = FusedNetworks.of(networks)
        device = model.stacked[0].device
        return cls(model, CohortAdam(
            list(model.stacked), torch.tensor(lrs, dtype=torch.float64, device=device),
            torch.zeros(len(lrs), dtype=torch.float64, device=device),
            [torch.zeros_like(p) for p in model.stacked], [torch.zeros_like(p) for p in model.stacked],
        ))

    @classmethod
    def empty(cls, device: torch.device) -> Fused:
        """No members yet (a cohort that is filled by `cat`)."""
        with torch.device("meta"):
            shapes = [p.shape for p in Network().parameters()]
        rows = [[torch.zeros((0, *shape), device=device) for shape in shapes] for _ in range(3)]
        state = [torch.zeros(0, dtype=torch.float64, device=device) for _ in range(2)]
        return cls._of(rows[0] + rows[1] + rows[2] + state)

    @classmethod
    def _of(cls, tensors: list[torch.Tensor]) -> Fused:
        n = len(parameter_names())
        model = FusedNetworks(tensors[:n])
        return cls(model, CohortAdam(list(model.stacked), tensors[3 * n], tensors[3 * n + 1],
                                     tensors[n : 2 * n], tensors[2 * n : 3 * n]))

    def _tensors(self) -> list[torch.Tensor]:
        o = self.optimizer
        return [p.detach() for p in self.model.stacked] + o.exp_avg + o.exp_avg_sq + [o.lr, o.steps]

    def select(self, rows: torch.Tensor) -> Fused:
        """A copy of the members at `rows`, in that order (no gradient accumulating: at an epoch's end)."""
        return Fused._of([t[rows] for t in self._tensors()])

    def put(self, rows: torch.Tensor, part: Fused) -> None:
        """Writes `part` (a select(rows) that trained) back into those rows."""
        with torch.no_grad():
            for whole, new in zip(self._tensors(), part._tensors()):
                whole.index_copy_(0, rows, new)

    def cat(self, other: Fused) -> Fused:
        return Fused._of([torch.cat([a, b]) for a, b in zip(self._tensors(), other._tensors())])

    def to(self, device: torch.device) -> Fused:
        return Fused._of([t.to(device) for t in self._tensors()])
