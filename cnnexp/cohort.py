"""Cohort training: K trials of the tutorial Network trained at once as one fused model (cnnexp.fused),
each computing exactly what its own `fit` with its seed computes, and refilled as trials leave.

A member is a trial at its own epoch, with its own shuffling generator seeded as `new_training_state`
seeds it: the same initial weights, the same per-epoch permutation, the same batches (the last partial
one included), the same mean-loss gradient and the same Adam update. Every epoch is one pass over the
same n images for every member, so members at different epochs still end an epoch together; that is
when members leave (pruned, complete, diverged) and new ones join (`Cohort.add`, from the callback).

Inputs: members whose permutations are equal (same seed and epoch: a fresh cohort) share one input
batch and conv1 is one dense convolution; otherwise each member gathers its own rows and conv1 is a
grouped convolution over [B, K, 28, 28]. That costs 28-36% more per epoch (K=8, 6,000 images, one
thread: 1.65 -> 2.12 s at batch 100, 2.10 -> 2.86 s at tune's batch mix), so it runs only when the
orders differ (benchmarks/cohort_refill.md).

Batch sizes: members consume one stream of micro-batches cut at every member's batch boundary; each
accumulates the micro-batches of its batch and steps, only its rows, when that batch is complete.
With equal batch sizes that is one micro-batch per step. Splitting members into sub-streams by batch
size (each its own fused model) measured slower at every split tried (K=8 batch mix: 1.44-1.71x
separate fits vs 1.88x for one stream), so the small-batch members' steps carry the others.
"""
from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from cnnexp.data import Split
from cnnexp.evaluate import EVAL_BATCH_SIZE
from cnnexp.fused import Fused, fused_forward
from cnnexp.model import Network, to_inputs
from cnnexp.train import NonFiniteLoss, to_device

MemberResult = dict | NonFiniteLoss
# Called after every epoch with each training member's metrics (or its NonFiniteLoss); returns the ids
# of members that leave now (pruned, failed, complete), and may `Cohort.add` members that join for the
# next epoch. Diverged members always leave.
CohortCallback = Callable[[dict[int, MemberResult]], Iterable[int] | None]


@dataclass(frozen=True)
class Member:
    lr: float
    batch_size: int


@dataclass
class Trainee:
    """A member's own progress: its configuration, epochs completed and shuffling generator."""

    member: Member
    generator: torch.Generator
    epoch: int = 0


@dataclass
class Cohort:
    """The fused rows and which member is which (by id, in row order)."""

    fused: Fused
    trainees: dict[int, Trainee] = field(default_factory=dict)
    history: dict[int, list[dict]] = field(default_factory=dict)

    @property
    def ids(self) -> list[int]:
        return list(self.trainees)

    @property
    def members(self) -> dict[int, Member]:
        return {i: t.member for i, t in self.trainees.items()}

    def network(self, member_id: int) -> Network:
        return self.fused.network(self.ids.index(member_id))

    def weights(self, member_id: int) -> dict[str, torch.Tensor]:
        return self.fused.weights(self.ids.index(member_id))

    def add(self, member_id: int, member: Member, seed: int) -> None:
        """A new member at its epoch 0, initialised and shuffled exactly as `new_training_state(lr, seed)`."""
        if member_id in self.trainees:
            raise ValueError(f"member {member_id} is already in the cohort")
        torch.manual_seed(seed)  # weight init, as new_training_state
        device = self.fused.flat.device
        self.fused = self.fused.cat(Fused.new([Network()], [member.lr]).to(device))
        self.trainees[member_id] = Trainee(member, torch.Generator().manual_seed(seed))

    def keep(self, member_ids: list[int]) -> None:
        """The members not named leave; the others' numbers do not change (each row is its own model)."""
        self.fused = self.fused.select(self._rows(member_ids))
        self.trainees = {i: self.trainees[i] for i in member_ids}

    def _rows(self, member_ids: list[int]) -> torch.Tensor:
        ids = self.ids
        return torch.tensor([ids.index(i) for i in member_ids], dtype=torch.long, device=self.fused.flat.device)


def new_cohort(members: list[Member], seed: int, device: torch.device) -> Cohort:
    """Members 0..K-1, each initialised exactly as `new_training_state` would with this seed."""
    cohort = Cohort(Fused.empty(device))
    for member_id, member in enumerate(members):
        cohort.add(member_id, member, seed)
    return cohort


@dataclass(frozen=True)
class MicroBatch:
    start: int
    stop: int
    inv_batch_len: torch.Tensor  # [K]: 1 / the length of the batch each member is filling
    stepping: torch.Tensor | None  # long: the members whose batch this micro-batch completes; None = all


def micro_batches(n: int, batch_sizes: list[int], device: torch.device) -> list[MicroBatch]:
    """The epoch's stream, cut at every member's batch boundary (the last partial batch included)."""
    cuts = sorted({n, *(start for b in batch_sizes for start in range(0, n, b))})
    same = len(set(batch_sizes)) == 1
    stream = []
    for start, stop in zip(cuts, cuts[1:]):
        lengths = [min(b, n - start // b * b) for b in batch_sizes]  # the batch this micro-batch is part of
        ends = [row for row, b in enumerate(batch_sizes) if stop % b == 0 or stop == n]
        stream.append(MicroBatch(
            start, stop, torch.tensor([1.0 / length for length in lengths], device=device),
            None if same else torch.tensor(ends, dtype=torch.long, device=device),
        ))
    return stream


def train_epoch(fused: Fused, orders: torch.Tensor, inputs: torch.Tensor, labels: torch.Tensor,
                stream: list[MicroBatch], bf16: bool = False,
                forward: Callable = fused_forward) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass for every member, each in its own order (orders [K, n], or [1, n] shared by all K);
    returns each member's summed loss and correct count, on the device.

    Nothing in the loop waits for the device: the stream's tensors were made before, sums stay on it.
    """
    k = fused.k
    flat = inputs.reshape(len(inputs), -1)
    loss_sum = torch.zeros(k, device=inputs.device)
    correct = torch.zeros(k, dtype=torch.int64, device=inputs.device)
    for micro in stream:
        rows = orders[:, micro.start : micro.stop]
        if len(orders) == 1:
            x = inputs[rows[0]]
        else:  # [B, K, 28, 28]: member j's images are channel j, conv1's group j
            x = flat[rows.t()].view(rows.shape[1], k, *inputs.shape[2:])
            x = x.contiguous(memory_format=torch.channels_last) if x.device.type == "cpu" else x
        y = labels[rows].expand(k, -1)
        with torch.autocast(inputs.device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = forward(fused.params, x)  # [K, b, classes]
            losses = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(k, -1).sum(dim=1)
        # Each member's loss is the sum over this part of its batch divided by the batch's length: summed
        # over the batch's micro-batches, that is the gradient of its own batch's mean loss.
        with warnings.catch_warnings():
            # Each gradient is a strided view of Fused.grad on purpose (one Adam over [R, P]); autograd
            # still accumulates into it in place, and warns that the layout is not the one it prefers.
            warnings.filterwarnings("ignore", message="grad and param do not obey the gradient layout contract")
            (losses * micro.inv_batch_len).sum().backward()
        fused.step(micro.stepping)
        fused.zero_grad(micro.stepping)
        loss_sum += losses.detach().float()
        correct += (logits.detach().argmax(dim=2) == y).sum(dim=1)
    return loss_sum, correct


@torch.inference_mode()
def evaluate(fused: Fused, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[list[float], list[float]]:
    """Each member's mean loss and accuracy; chunks keep K members' activations near one eval batch's."""
    k = fused.k
    chunk = max(1, EVAL_BATCH_SIZE // k)
    logits = torch.cat([fused.forward(inputs[i : i + chunk]) for i in range(0, len(inputs), chunk)], dim=1)
    losses = F.cross_entropy(logits.flatten(0, 1), labels.repeat(k), reduction="none").view(k, -1).mean(dim=1)
    accuracy = (logits.argmax(dim=2) == labels).double().mean(dim=1)
    return losses.tolist(), accuracy.tolist()


def _orders(cohort: Cohort, member_ids: list[int], n: int, device: torch.device) -> torch.Tensor:
    """Each member's permutation for its next epoch; one row when they are all the same."""
    perms = [torch.randperm(n, generator=cohort.trainees[i].generator) for i in member_ids]
    shared = all(torch.equal(p, perms[0]) for p in perms[1:])
    return torch.stack(perms[:1] if shared else perms).to(device)


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
    """Trains every member up to its own `epochs`, or until it leaves; returns each member's metrics per
    epoch (its own epoch numbers). Members that complete stay, untrained, until the callback lets them go.

    A member whose train loss is not finite leaves with a NonFiniteLoss in its place (as `fit` raises).
    epoch_time_s is the cohort's: the time all its training members took together.
    """
    device = cohort.fused.flat.device
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    forward = torch.compile(fused_forward) if torch_compile else fused_forward
    train_x, train_y = to_inputs(to_device(train.images, device)), to_device(train.labels, device)
    val_x, val_y = to_inputs(to_device(val.images, device)), to_device(val.labels, device)
    if device.type == "cpu":
        train_x, val_x = (x.contiguous(memory_format=torch.channels_last) for x in (train_x, val_x))
    n, streams = len(train_y), {}
    while training := [i for i, t in cohort.trainees.items() if t.epoch < epochs]:
        started = time.perf_counter()
        rows = cohort._rows(training)
        part = cohort.fused if training == cohort.ids else cohort.fused.select(rows)
        sizes = tuple(cohort.trainees[i].member.batch_size for i in training)
        if sizes not in streams:
            streams[sizes] = micro_batches(n, list(sizes), device)
        losses, hits = train_epoch(part, _orders(cohort, training, n, device), train_x, train_y, streams[sizes], bf16, forward)
        val_loss, val_accuracy = evaluate(part, val_x, val_y)
        if part is not cohort.fused:
            cohort.fused.put(rows, part)
        train_loss, train_accuracy = (losses / n).tolist(), (hits.double() / n).tolist()
        elapsed = time.perf_counter() - started
        results: dict[int, MemberResult] = {}
        for row, member_id in enumerate(training):
            trainee = cohort.trainees[member_id]
            trainee.epoch += 1
            if not math.isfinite(train_loss[row]):
                results[member_id] = NonFiniteLoss(trainee.epoch, train_loss[row])
                continue
            results[member_id] = {
                "epoch": trainee.epoch, "train_loss": train_loss[row], "train_accuracy": train_accuracy[row],
                "val_loss": val_loss[row], "val_accuracy": val_accuracy[row], "epoch_time_s": elapsed,
            }
            cohort.history.setdefault(member_id, []).append(results[member_id])
        leaving = set(on_epoch_end(results) or ()) if on_epoch_end is not None else set()
        leaving |= {i for i, result in results.items() if isinstance(result, NonFiniteLoss)}
        if leaving:
            cohort.keep([i for i in cohort.ids if i not in leaving])
    return cohort.history
