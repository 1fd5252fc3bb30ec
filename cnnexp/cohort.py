"""Cohort training: K configurations of the tutorial Network trained at once, as one fused model.

Each member computes exactly what its own `fit` with the same seed computes: the same initial weights
and per-epoch permutation (every member shares them, so one input batch feeds all K), the same batches
(the last partial one included), the same mean-loss gradient and the same Adam update with its own lr
and step count. What is fused is the work, not the math (HFTA, MLSys 2021):
- conv1 is one convolution with 6K outputs over the shared input, conv2 a grouped convolution (groups=K);
- the linear layers are batched matmuls over [K, batch, features];
- one Adam update runs over the stacked parameters, with one lr and one bias correction per member.

Members may differ in batch size. They consume one stream of micro-batches cut at every member's batch
boundary; each member accumulates the micro-batches of its batch and steps when that batch is complete.
With equal batch sizes that is one micro-batch per step and no masking.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from cnnexp.data import Split
from cnnexp.evaluate import EVAL_BATCH_SIZE
from cnnexp.model import Network, to_inputs
from cnnexp.train import NonFiniteLoss, to_device

# torch.optim.Adam's defaults, which `fit` uses.
BETA1, BETA2, EPS = 0.9, 0.999, 1e-8

MemberResult = dict | NonFiniteLoss
# Called after every epoch with each active member's metrics (or its NonFiniteLoss); returns the ids
# of members that leave the cohort now (pruned, failed). Diverged members always leave.
CohortCallback = Callable[[dict[int, MemberResult]], Iterable[int]]


@dataclass(frozen=True)
class Member:
    lr: float
    batch_size: int


class FusedNetworks(nn.Module):
    """K tutorial Networks in one module: every parameter is the K members' stacked on a leading dim."""

    def __init__(self, networks: list[Network]):
        super().__init__()
        self.names = [name for name, _ in networks[0].named_parameters()]
        self.stacked = nn.ParameterList(
            nn.Parameter(torch.stack([dict(n.named_parameters())[name].detach() for n in networks]).contiguous())
            for name in self.names
        )

    @property
    def k(self) -> int:
        return len(self.stacked[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, 1, 28, 28], shared by all members -> logits [K, B, classes]."""
        k, batch = self.k, len(x)
        conv1_w, conv1_b, conv2_w, conv2_b, fc1_w, fc1_b, fc2_w, fc2_b, out_w, out_b = self.stacked
        if x.device.type == "cpu":
            x = _channels_last_strides(x)
        # Pooling before relu is the same function with the same gradient (relu is monotonic, so it
        # commutes with max) on a quarter of the values.
        t = F.conv2d(x, _as_conv_weight(conv1_w), conv1_b.flatten())
        t = F.relu(F.max_pool2d(t, kernel_size=2, stride=2))
        t = F.conv2d(t, _as_conv_weight(conv2_w), conv2_b.flatten(), groups=k)
        t = F.relu(F.max_pool2d(t, kernel_size=2, stride=2))
        # [B, K*12, 4, 4] -> [K, B, 192], each member's features in Network's flatten order (c, h, w).
        t = t.reshape(batch, k, -1).transpose(0, 1)
        t = F.relu(torch.baddbmm(fc1_b.unsqueeze(1), t, fc1_w.transpose(1, 2)))
        t = F.relu(torch.baddbmm(fc2_b.unsqueeze(1), t, fc2_w.transpose(1, 2)))
        return torch.baddbmm(out_b.unsqueeze(1), t, out_w.transpose(1, 2))

    def weights(self, index: int) -> dict[str, torch.Tensor]:
        """Member `index`'s slice of the fused weights, by Network's parameter names (views, not copies)."""
        return {name: p[index].detach() for name, p in zip(self.names, self.stacked)}

    def member(self, index: int) -> Network:
        """Member `index` as a plain Network (a copy of its slice of the fused weights)."""
        network = Network(num_classes=self.stacked[-1].shape[1]).to(self.stacked[0].device)
        network.load_state_dict(self.weights(index))  # load_state_dict copies
        return network


def _channels_last_strides(x: torch.Tensor) -> torch.Tensor:
    """The one-channel batch with NHWC strides. With one channel NCHW and NHWC hold the same bytes, but
    only these strides make oneDNN write conv1's 6K channels NHWC, where its pooling is 4-5x faster
    (conv1 + pool1 of a K=16, batch-100 step: 49 ms -> 13 ms on one thread)."""
    n, c, h, w = x.shape
    return x.as_strided(x.shape, (c * h * w, 1, w * c, c)) if c == 1 else x.contiguous(memory_format=torch.channels_last)


def _as_conv_weight(stacked: torch.Tensor) -> torch.Tensor:
    """[K, out, in, kh, kw] -> [K*out, in, kh, kw]; channels_last on CPU, where oneDNN's NHWC kernels are faster."""
    weight = stacked.flatten(0, 1)
    return weight.contiguous(memory_format=torch.channels_last) if weight.device.type == "cpu" else weight


class CohortAdam:
    """torch.optim.Adam (default betas and eps, no weight decay) over stacked parameters: one lr and one
    step count per member, and an update restricted to the members whose batch is complete."""

    def __init__(self, params: list[nn.Parameter], lrs: list[float]):
        self.params = list(params)
        device = self.params[0].device
        self.lr = torch.tensor(lrs, dtype=torch.float64, device=device)
        self.steps = torch.zeros(len(lrs), dtype=torch.float64, device=device)
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]

    def step(self, stepping: torch.Tensor | None = None) -> None:
        """stepping: float [K] of 1 (batch complete) and 0 (still accumulating); None = every member."""
        with torch.no_grad():
            if stepping is None:
                self.steps += 1
            else:
                self.steps += stepping.to(torch.float64)
            steps = self.steps.clamp(min=1)  # a member yet to step is masked out below
            # Bias corrections in float64, as Adam computes them from its step count.
            step_size = (self.lr / (1 - BETA1**steps)).float()
            correction2_sqrt = (1 - BETA2**steps).sqrt().float()
            if stepping is not None:
                step_size = step_size * stepping
            for p, m, v in zip(self.params, self.exp_avg, self.exp_avg_sq):
                shape = (-1,) + (1,) * (p.dim() - 1)
                g = p.grad
                if stepping is None:
                    m.lerp_(g, 1 - BETA1)
                    v.mul_(BETA2).addcmul_(g, g, value=1 - BETA2)
                else:
                    mask = stepping.view(shape)
                    m.lerp_(g, mask * (1 - BETA1))  # weight 0 leaves a waiting member's moments exactly as they were
                    v.mul_(1 - mask * (1 - BETA2)).addcmul_(g, g * mask, value=1 - BETA2)
                denom = (v.sqrt() / correction2_sqrt.view(shape)).add_(EPS)
                p.sub_(step_size.view(shape) * m / denom)

    def zero_grad(self, stepping: torch.Tensor | None = None) -> None:
        """Clears the gradients of the members that stepped; the others keep accumulating."""
        for p in self.params:
            if stepping is None:
                p.grad = None
            elif p.grad is not None:
                p.grad.mul_(1 - stepping.view((-1,) + (1,) * (p.dim() - 1)))

    def keep(self, rows: torch.Tensor, params: list[nn.Parameter]) -> None:
        """Only the members at `rows` go on, now held in `params`."""
        self.params = list(params)
        self.lr, self.steps = self.lr[rows], self.steps[rows]
        self.exp_avg = [m[rows] for m in self.exp_avg]
        self.exp_avg_sq = [v[rows] for v in self.exp_avg_sq]


@dataclass
class Cohort:
    """The fused model, its optimizer and shuffling generator, and which member is which (by id)."""

    model: FusedNetworks
    optimizer: CohortAdam
    generator: torch.Generator
    members: dict[int, Member]  # id -> configuration, in the fused model's row order
    epoch: int = 0
    history: dict[int, list[dict]] = field(default_factory=dict)

    @property
    def ids(self) -> list[int]:
        return list(self.members)

    def network(self, member_id: int) -> Network:
        return self.model.member(self.ids.index(member_id))

    def weights(self, member_id: int) -> dict[str, torch.Tensor]:
        return self.model.weights(self.ids.index(member_id))

    def keep(self, member_ids: list[int]) -> None:
        """The members not named leave; the others' numbers do not change (each row is its own model)."""
        rows = torch.tensor([self.ids.index(i) for i in member_ids], dtype=torch.long,
                            device=self.model.stacked[0].device)
        with torch.no_grad():
            for p in self.model.stacked:
                p.data = p.data[rows].contiguous()  # same Parameter objects, fewer rows
                p.grad = None  # every member stepped at the epoch's end: nothing is accumulating
        self.optimizer.keep(rows, list(self.model.stacked))
        self.members = {i: self.members[i] for i in member_ids}


def new_cohort(members: list[Member], seed: int, device: torch.device) -> Cohort:
    """Members 0..K-1, each initialised exactly as `new_training_state` would with this seed."""
    torch.manual_seed(seed)  # weight init: the same for every member, as for K separate fits
    template = Network()
    model = FusedNetworks([template] * len(members)).to(device)
    optimizer = CohortAdam(list(model.stacked), [m.lr for m in members])
    generator = torch.Generator().manual_seed(seed)
    return Cohort(model, optimizer, generator, dict(enumerate(members)))


@dataclass(frozen=True)
class MicroBatch:
    start: int
    stop: int
    inv_batch_len: torch.Tensor  # [K]: 1 / the length of the batch each member is filling
    stepping: torch.Tensor | None  # [K] 1 where this micro-batch completes the member's batch; None = all


def micro_batches(n: int, batch_sizes: list[int], device: torch.device) -> list[MicroBatch]:
    """The epoch's stream, cut at every member's batch boundary (the last partial batch included)."""
    cuts = sorted({n, *(start for b in batch_sizes for start in range(0, n, b))})
    same = len(set(batch_sizes)) == 1
    stream = []
    for start, stop in zip(cuts, cuts[1:]):
        lengths = [min(b, n - start // b * b) for b in batch_sizes]  # the batch this micro-batch is part of
        ends = [float(stop % b == 0 or stop == n) for b in batch_sizes]
        stream.append(MicroBatch(
            start, stop, torch.tensor([1.0 / length for length in lengths], device=device),
            None if same else torch.tensor(ends, device=device),
        ))
    return stream


def train_epoch(cohort: Cohort, inputs: torch.Tensor, labels: torch.Tensor, stream: list[MicroBatch],
                bf16: bool = False, forward: nn.Module | None = None) -> tuple[list[float], list[float]]:
    """One pass over the shuffled split for every member; returns each member's mean loss and accuracy.

    Nothing in the loop waits for the device: the stream's tensors were made before, sums stay on it.
    """
    model, optimizer, n = forward or cohort.model, cohort.optimizer, len(labels)
    k = cohort.model.k
    order = torch.randperm(n, generator=cohort.generator).to(inputs.device)
    loss_sum = torch.zeros(k, device=inputs.device)
    correct = torch.zeros(k, dtype=torch.int64, device=inputs.device)
    for micro in stream:
        rows = order[micro.start : micro.stop]
        x, y = inputs[rows], labels[rows]
        with torch.autocast(inputs.device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)  # [K, b, classes]
            losses = F.cross_entropy(logits.flatten(0, 1), y.repeat(k), reduction="none").view(k, -1).sum(dim=1)
        # Each member's loss is the sum over this part of its batch divided by the batch's length: summed
        # over the batch's micro-batches, that is the gradient of its own batch's mean loss.
        (losses * micro.inv_batch_len).sum().backward()
        optimizer.step(micro.stepping)
        optimizer.zero_grad(micro.stepping)
        loss_sum += losses.detach().float()
        correct += (logits.detach().argmax(dim=2) == y).sum(dim=1)
    return (loss_sum / n).tolist(), (correct.double() / n).tolist()


@torch.inference_mode()
def evaluate(model: FusedNetworks, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[list[float], list[float]]:
    """Each member's mean loss and accuracy; chunks keep K members' activations near one eval batch's."""
    k = model.k
    chunk = max(1, EVAL_BATCH_SIZE // k)
    logits = torch.cat([model(inputs[i : i + chunk]) for i in range(0, len(inputs), chunk)], dim=1)
    losses = F.cross_entropy(logits.flatten(0, 1), labels.repeat(k), reduction="none").view(k, -1).mean(dim=1)
    accuracy = (logits.argmax(dim=2) == labels).double().mean(dim=1)
    return losses.tolist(), accuracy.tolist()


def fit_cohort(
    cohort: Cohort,
    train: Split,
    val: Split,
    *,
    epochs: int,
    on_epoch_end: CohortCallback | None = None,
    bf16: bool = False,
    torch_compile: bool = False,
) -> dict[int, list[dict]]:
    """Trains every member up to `epochs` or until it leaves; returns each member's metrics per epoch.

    A member whose train loss is not finite leaves with a NonFiniteLoss in its place (as `fit` raises).
    epoch_time_s is the cohort's: the time all its members took together.
    """
    device = cohort.model.stacked[0].device
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    forward = torch.compile(cohort.model) if torch_compile else cohort.model
    train_x, train_y = to_inputs(to_device(train.images, device)), to_device(train.labels, device)
    val_x, val_y = to_inputs(to_device(val.images, device)), to_device(val.labels, device)
    if device.type == "cpu":
        train_x, val_x = (x.contiguous(memory_format=torch.channels_last) for x in (train_x, val_x))
    stream = None
    while cohort.epoch < epochs and cohort.members:
        epoch = cohort.epoch + 1
        started = time.perf_counter()
        if stream is None:  # again only when members leave
            stream = micro_batches(len(train_y), [m.batch_size for m in cohort.members.values()], device)
        train_loss, train_accuracy = train_epoch(cohort, train_x, train_y, stream, bf16, forward)
        val_loss, val_accuracy = evaluate(cohort.model, val_x, val_y)
        cohort.epoch = epoch
        elapsed = time.perf_counter() - started
        results: dict[int, MemberResult] = {}
        for row, member_id in enumerate(cohort.ids):
            if not math.isfinite(train_loss[row]):
                results[member_id] = NonFiniteLoss(epoch, train_loss[row])
                continue
            results[member_id] = {
                "epoch": epoch, "train_loss": train_loss[row], "train_accuracy": train_accuracy[row],
                "val_loss": val_loss[row], "val_accuracy": val_accuracy[row], "epoch_time_s": elapsed,
            }
            cohort.history.setdefault(member_id, []).append(results[member_id])
        leaving = set(on_epoch_end(results) if on_epoch_end is not None else ())
        leaving |= {i for i, result in results.items() if isinstance(result, NonFiniteLoss)}
        if leaving:
            cohort.keep([i for i in cohort.ids if i not in leaving])
            stream = None
    return cohort.history
