"""K tutorial Networks as one model: every parameter, gradient and Adam moment a row per member.

What is fused is the work, not the math (HFTA, MLSys 2021): conv1 is one convolution with 6K outputs
(over one shared input, or grouped over K inputs), conv2 a grouped convolution (groups=K), the linear
layers batched matmuls over [K, batch, features], and one Adam update with one lr and step count per
member runs over the stacked rows. A member is a row of flat buffers (`Fused`): rows are selected,
written back, dropped and appended without changing any other row's numbers.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from cnnexp.model import Network

# torch.optim.Adam's defaults, which `fit` uses.
BETA1, BETA2, EPS = 0.9, 0.999, 1e-8


@functools.cache
def _meta_network() -> Network:
    with torch.device("meta"):  # no init on the CPU: the global RNG is left as it was
        return Network()


def parameter_names() -> tuple[str, ...]:
    return tuple(name for name, _ in _meta_network().named_parameters())


def parameter_shapes() -> tuple[torch.Size, ...]:
    return tuple(p.shape for p in _meta_network().parameters())


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


class Fused:
    """K members' parameters, gradients and Adam moments (torch.optim.Adam's defaults, no weight decay)
    as the rows of flat [K, P] buffers, with one lr and one step count per member.

    Each parameter is a view of its columns of `flat` and its gradient a view of `grad`, so autograd
    accumulates into `grad` in place and one Adam update is a dozen ops over [R, P] rather than a dozen
    per parameter: at tune's batch mix most micro-batches step two or three of the K members, and only
    those rows are read and written. K=8 at tune's batch mix (6,000 images, one thread): masked Adam
    over all rows 2.78 s an epoch, over the stepping rows 2.35 s (1.45x -> 1.71x eight separate fits in
    that run; 1.87x -> 2.20x in a quieter one); at batch 100, where all rows step, 1.39 vs 1.41 s.
    """

    def __init__(self, flat: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                 lr: torch.Tensor, steps: torch.Tensor):
        self.flat, self.exp_avg, self.exp_avg_sq = flat, exp_avg, exp_avg_sq
        self.lr, self.steps = lr, steps  # float64 [K]
        self.grad = torch.zeros_like(flat)
        self.params: list[torch.Tensor] = []
        start = 0
        for shape in parameter_shapes():
            stop = start + math.prod(shape)
            param = flat[:, start:stop].view(len(flat), *shape).detach().requires_grad_()
            param.grad = self.grad[:, start:stop].view(len(flat), *shape)
            self.params.append(param)
            start = stop

    @classmethod
    def new(cls, networks: list[Network], lrs: list[float]) -> Fused:
        flat = torch.stack([torch.cat([p.detach().flatten() for p in n.parameters()]) for n in networks])
        return cls(flat, torch.zeros_like(flat), torch.zeros_like(flat),
                   torch.tensor(lrs, dtype=torch.float64, device=flat.device),
                   torch.zeros(len(lrs), dtype=torch.float64, device=flat.device))

    @classmethod
    def empty(cls, device: torch.device) -> Fused:
        """No members yet (a cohort that is filled by `cat`)."""
        width = sum(math.prod(shape) for shape in parameter_shapes())
        rows = [torch.zeros((0, width), device=device) for _ in range(3)]
        return cls(*rows, *(torch.zeros(0, dtype=torch.float64, device=device) for _ in range(2)))

    @property
    def k(self) -> int:
        return len(self.flat)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused_forward(self.params, x)

    def step(self, rows: torch.Tensor | None = None) -> None:
        """Adam for the members at rows (long [R]: those whose batch is complete); None = every member."""
        with torch.no_grad():
            if rows is None:
                self.steps += 1
                steps, lr = self.steps, self.lr
                w, g, m, v = self.flat, self.grad, self.exp_avg, self.exp_avg_sq
            else:
                self.steps[rows] += 1
                steps, lr = self.steps[rows], self.lr[rows]
                w, g, m, v = (t.index_select(0, rows) for t in (self.flat, self.grad, self.exp_avg, self.exp_avg_sq))
            # Bias corrections in float64, as Adam computes them from its step count.
            step_size = (lr / (1 - BETA1**steps)).float().unsqueeze(1)
            correction2_sqrt = (1 - BETA2**steps).sqrt().float().unsqueeze(1)
            m.lerp_(g, 1 - BETA1)
            v.mul_(BETA2).addcmul_(g, g, value=1 - BETA2)
            denom = (v.sqrt() / correction2_sqrt).add_(EPS)
            w.sub_(step_size * m / denom)
            if rows is not None:
                for whole, part in ((self.flat, w), (self.exp_avg, m), (self.exp_avg_sq, v)):
                    whole.index_copy_(0, rows, part)

    def zero_grad(self, rows: torch.Tensor | None = None) -> None:
        """Clears the gradients of the members that stepped; the others keep accumulating."""
        if rows is None:
            self.grad.zero_()
        else:
            self.grad.index_fill_(0, rows, 0)

    def weights(self, index: int) -> dict[str, torch.Tensor]:
        """Member `index`'s weights, by Network's parameter names (views, not copies)."""
        return {name: p[index].detach() for name, p in zip(parameter_names(), self.params)}

    def network(self, index: int) -> Network:
        """Member `index` as a plain Network (a copy of its weights)."""
        network = Network(num_classes=self.params[-1].shape[1]).to(self.flat.device)
        network.load_state_dict(self.weights(index))  # load_state_dict copies
        return network

    def _rows(self) -> list[torch.Tensor]:
        return [self.flat, self.exp_avg, self.exp_avg_sq, self.lr, self.steps]

    def select(self, rows: torch.Tensor) -> Fused:
        """A copy of the members at `rows`, in that order (at an epoch's end: no gradient accumulating)."""
        return Fused(*(t[rows] for t in self._rows()))

    def put(self, rows: torch.Tensor, part: Fused) -> None:
        """Writes `part` (a select(rows) that trained) back into those rows."""
        for whole, new in zip(self._rows(), part._rows()):
            whole.index_copy_(0, rows, new)

    def cat(self, other: Fused) -> Fused:
        return Fused(*(torch.cat([a, b]) for a, b in zip(self._rows(), other._rows())))

    def to(self, device: torch.device) -> Fused:
        return Fused(*(t.to(device) for t in self._rows()))
