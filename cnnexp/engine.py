"""The one training engine: a fixed-capacity table of slots on the device, trained an epoch at a time.

A slot is one member (a trial, or `fit`'s one run): its weights, Adam moments, lr and step count are rows
of flat [capacity, P] buffers, one table per batch size. A member joins by writing into a free row and
leaves by clearing its row (the last row moves into the hole), so nothing is reallocated when membership
changes. Every member computes what it would alone: its own init and shuffling generator (seeded as
`fit` seeds them), its own batches, the gradient of its own batch's mean loss and its own Adam update.

Each epoch is data made once (cnnexp.schedule), so every step has one shape. On CUDA that step (forward,
backward, Adam) is captured once per table and active-row count, rounded up to a power of two (rows past
the members are cleared: lr 0, no step), and replayed: the host launches one graph per step instead of
~60 kernels, and nothing waits on the device until the epoch's metrics are read. On the CPU the step runs
eagerly over exactly the active rows, with one shared input when every member's order is the same.

The caller drives: `for results in engine.epochs(): ...`, with joins and leaves between epochs only.
"""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cnnexp.data import Split
from cnnexp.evaluate import EVAL_BATCH_SIZE
from cnnexp.fused import flatten, fused_forward, parameter_count, row_views, unflatten
from cnnexp.model import Network, to_inputs
from cnnexp.schedule import batch_weights, epoch_orders, padded_rows

# torch.optim.Adam's defaults, the tutorial's optimizer.
BETA1, BETA2, EPS = 0.9, 0.999, 1e-8
# Called on the host after each step of a one-table epoch: (step, the running sum of each row's loss on the device).
StepCallback = Callable[[int, torch.Tensor], None]


class NonFiniteLoss(ArithmeticError):
    """Training diverged; carries the epoch so callers can say where."""

    def __init__(self, epoch: int, loss: float):
        super().__init__(f"training loss became {loss} in epoch {epoch}; try a smaller lr")
        self.epoch = epoch


MemberResult = dict | NonFiniteLoss


@dataclass(frozen=True)
class Member:
    lr: float
    batch_size: int


@dataclass
class Slot:
    member: Member
    generator: torch.Generator
    epoch: int = 0  # epochs completed


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A split, resident on the device for the whole fit; to a GPU from pinned memory, asynchronously."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


@dataclass(frozen=True)
class Resident:
    """The training and validation images on the device, as the network takes them."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor

    @classmethod
    def of(cls, train: Split, val: Split, device: torch.device) -> Resident:
        return cls(to_inputs(to_device(train.images, device)), to_device(train.labels, device),
                   to_inputs(to_device(val.images, device)), to_device(val.labels, device))


class Table:
    """The slots of one batch size, packed: rows [0, k) hold the members `ids` names, in that order."""

    def __init__(self, batch_size: int, capacity: int, n: int, device: torch.device, graphs: bool):
        self.batch_size, self.capacity, self.n, self.device = batch_size, capacity, n, device
        width = parameter_count()
        self.flat, self.exp_avg, self.exp_avg_sq = (torch.zeros(capacity, width, device=device) for _ in range(3))
        self.lr, self.steps = (torch.zeros(capacity, dtype=torch.float64, device=device) for _ in range(2))
        self.loss_sum = torch.zeros(capacity, device=device)
        self.correct = torch.zeros(capacity, dtype=torch.int64, device=device)
        self.ids: list[int] = []
        self.weights = batch_weights(n, batch_size).to(device)  # [S, b]
        self.valid = self.weights > 0
        self._leaves: dict[int, list[torch.Tensor]] = {}
        # CUDA graphs read their step's rows from fixed addresses: the epoch's schedule is copied in, and
        # the step index is device data the step itself advances.
        self.rows = torch.zeros(len(self.weights), capacity, batch_size, dtype=torch.long, device=device) if graphs else None
        self.step_index = torch.zeros(1, dtype=torch.long, device=device)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}

    @property
    def k(self) -> int:
        return len(self.ids)

    def _buffers(self) -> tuple[torch.Tensor, ...]:
        return self.flat, self.exp_avg, self.exp_avg_sq, self.lr, self.steps

    def add(self, slot_id: int, weights: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
            lr: float, steps: int) -> None:
        row = self.k
        for buffer, value in zip(self._buffers(), (weights, exp_avg, exp_avg_sq, lr, steps)):
            buffer[row] = value
        self.ids.append(slot_id)

    def remove(self, slot_id: int) -> None:
        row, last = self.ids.index(slot_id), self.k - 1
        for buffer in self._buffers():
            if row != last:
                buffer[row] = buffer[last]
            buffer[last] = 0  # a cleared row: lr 0 takes no step, zero weights give finite logits
        self.ids[row] = self.ids[last]
        self.ids.pop()

    def row(self, slot_id: int) -> int:
        return self.ids.index(slot_id)

    def rows_run(self) -> int:
        """How many rows a step computes: exactly the members on the CPU; on CUDA a power of two, so that a
        handful of captured graphs serve every count."""
        if self.rows is None:
            return self.k
        return min(self.capacity, 1 << (self.k - 1).bit_length())

    def _params(self, k: int) -> list[torch.Tensor]:
        """Leaf views of rows [0, k): autograd's gradients of them are each member's own."""
        if k not in self._leaves:
            self._leaves[k] = [view.detach().requires_grad_() for view in row_views(self.flat[:k])]
        return self._leaves[k]

    def step(self, k: int, rows: torch.Tensor, weights: torch.Tensor, valid: torch.Tensor, data: Resident,
             forward: Callable, bf16: bool) -> None:
        """One batch for rows [0, k): rows [k or 1, b] of the training split, weights [b] (1/len, 0 = padding)."""
        params, b = self._params(k), self.batch_size
        if len(rows) == 1:  # one order shared by every member: one input batch, conv1 over 6k channels
            x, y = data.train_x[rows[0]], data.train_y[rows[0]].expand(k, -1)
        else:  # [b, k, 28, 28]: member j's images are channel j, conv1's group j
            x = data.train_x.view(self.n, -1)[rows.t()].view(b, k, *data.train_x.shape[2:])
            x = x.contiguous(memory_format=torch.channels_last) if x.device.type == "cpu" else x
            y = data.train_y[rows]
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = forward(params, x)  # [k, b, classes]
            losses = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(k, b)
        # Each member's weighted sum is its own batch's mean loss; the sum over members separates, so
        # each row's gradient is its own.
        grads = torch.autograd.grad((losses * weights).sum(), params)
        self._adam(k, torch.cat([g.reshape(k, -1) for g in grads], dim=1))
        self.loss_sum[:k] += (losses.detach().float() * valid).sum(dim=1)
        self.correct[:k] += ((logits.detach().argmax(dim=2) == y) & valid).sum(dim=1)

    @torch.no_grad()
    def _adam(self, k: int, grad: torch.Tensor) -> None:
        """torch.optim.Adam's update for rows [0, k), each with its own lr and step count; cleared rows (lr 0)
        do not step."""
        lr, steps = self.lr[:k], self.steps[:k]
        steps.add_((lr > 0).to(steps.dtype))
        counted = steps.clamp(min=1)  # a cleared row's 0 would divide by zero below
        # Bias corrections in float64, as Adam computes them from its step count.
        step_size = (lr / (1 - BETA1**counted)).float().unsqueeze(1)
        correction2_sqrt = (1 - BETA2**counted).sqrt().float().unsqueeze(1)
        w, m, v = self.flat[:k], self.exp_avg[:k], self.exp_avg_sq[:k]
        m.lerp_(grad, 1 - BETA1)
        v.mul_(BETA2).addcmul_(grad, grad, value=1 - BETA2)
        w.sub_(step_size * m / (v.sqrt() / correction2_sqrt).add_(EPS))

    def load_schedule(self, orders: torch.Tensor) -> torch.Tensor | None:
        """Copies the epoch's rows into the graphs' buffer (returns None), or returns them for eager steps."""
        self.loss_sum.zero_()
        self.correct.zero_()
        if self.rows is None:
            shared = all(torch.equal(order, orders[0]) for order in orders[1:])
            return padded_rows(orders[:1] if shared else orders, self.batch_size).to(self.device)
        self.rows[:, : self.k].copy_(padded_rows(orders, self.batch_size).pin_memory(), non_blocking=True)
        self.step_index.zero_()
        return None

    def train_epoch(self, rows: torch.Tensor | None, data: Resident, forward: Callable, bf16: bool,
                    on_step: StepCallback | None) -> None:
        k = self.rows_run()
        step = self._graph(k, data, forward, bf16).replay if rows is None else None
        for s in range(len(self.weights)):
            if step is not None:
                step()
            else:
                self.step(k, rows[s], self.weights[s], self.valid[s], data, forward, bf16)
            if on_step is not None:
                on_step(s, self.loss_sum[: self.k])

    def _graph_step(self, k: int, data: Resident, forward: Callable, bf16: bool) -> None:
        s = self.step_index
        rows = self.rows.index_select(0, s)[0, :k]
        self.step(k, rows, self.weights.index_select(0, s)[0], self.valid.index_select(0, s)[0], data, forward, bf16)
        s += 1

    def _graph(self, k: int, data: Resident, forward: Callable, bf16: bool) -> torch.cuda.CUDAGraph:
        """The step over rows [0, k), captured once; warm-up steps run on copies' behalf and are undone."""
        if k not in self._graphs:
            kept = [t.clone() for t in (*self._buffers(), self.loss_sum, self.correct, self.step_index)]
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):  # cuDNN and cuBLAS choose and allocate before capture
                    self._graph_step(k, data, forward, bf16)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._graph_step(k, data, forward, bf16)
            for tensor, value in zip((*self._buffers(), self.loss_sum, self.correct, self.step_index), kept):
                tensor.copy_(value)
            self._graphs[k] = graph
        return self._graphs[k]

    @torch.inference_mode()
    def evaluate(self, data: Resident, forward: Callable) -> tuple[torch.Tensor, torch.Tensor]:
        """Each member's mean validation loss and accuracy, on the device; chunks keep the activations of k
        members near one evaluation batch's."""
        k, x, y = self.k, data.val_x, data.val_y
        params = row_views(self.flat[:k])
        chunk = max(1, EVAL_BATCH_SIZE * (8 if self.device.type == "cuda" else 1) // k)
        logits = torch.cat([forward(params, x[i : i + chunk]) for i in range(0, len(x), chunk)], dim=1)
        losses = F.cross_entropy(logits.flatten(0, 1), y.repeat(k), reduction="none").view(k, -1).mean(dim=1)
        return losses, (logits.argmax(dim=2) == y).double().mean(dim=1)


class Engine:
    """Members in slots of batch-size tables; `epochs()` trains every member one epoch per iteration."""

    def __init__(self, capacity: int, train: Split, val: Split, device: torch.device, *, bf16: bool = False,
                 torch_compile: bool = False, graphs: bool | None = None, streams: bool = False):
        self.capacity, self.device, self.bf16 = capacity, device, bf16
        # On CUDA, each batch-size table's steps on a stream of its own, side by side with the others'.
        self.streams = streams and device.type == "cuda"
        # Captured graphs and torch.compile do not nest; a compiled step runs eagerly.
        self.graphs = (device.type == "cuda" and not torch_compile) if graphs is None else graphs
        self.forward = torch.compile(fused_forward) if torch_compile else fused_forward
        self.data = Resident.of(train, val, device)
        self.n = len(train.labels)
        self.tables: dict[int, Table] = {}
        self.slots: dict[int, Slot] = {}
        self._next_id = 0
        self._streams: dict[int, torch.cuda.Stream] = {}

    def _stream(self, table: Table) -> contextlib.AbstractContextManager:
        if not self.streams:
            return contextlib.nullcontext()
        stream = self._streams.setdefault(table.batch_size, torch.cuda.Stream(self.device))
        stream.wait_stream(torch.cuda.current_stream(self.device))  # the schedule and any joins first
        return torch.cuda.stream(stream)

    @property
    def free(self) -> int:
        return self.capacity - len(self.slots)

    def join(self, member: Member, seed: int) -> int:
        """A new member at its epoch 0, initialised and shuffled as `new_training_state(lr, seed)`; its slot id."""
        torch.manual_seed(seed)  # weight init
        network = Network()
        zeros = torch.zeros(parameter_count())
        return self.join_state(member, flatten(list(network.parameters())), zeros, zeros, 0,
                               torch.Generator().manual_seed(seed), 0)

    def join_state(self, member: Member, weights: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                   steps: int, generator: torch.Generator, epoch: int) -> int:
        """A member that has trained before (a resumed run): rows [P] of weights and Adam moments."""
        if not self.free:
            raise ValueError(f"all {self.capacity} slots are taken")
        b = member.batch_size
        if b not in self.tables:
            self.tables[b] = Table(b, self.capacity, self.n, self.device, self.graphs)
        slot_id, self._next_id = self._next_id, self._next_id + 1
        self.tables[b].add(slot_id, weights, exp_avg, exp_avg_sq, member.lr, steps)
        self.slots[slot_id] = Slot(member, generator, epoch)
        return slot_id

    def leave(self, slot_id: int) -> None:
        self.tables[self.slots.pop(slot_id).member.batch_size].remove(slot_id)

    def _where(self, slot_id: int) -> tuple[Table, int]:
        table = self.tables[self.slots[slot_id].member.batch_size]
        return table, table.row(slot_id)

    def weights(self, slot_id: int) -> dict[str, torch.Tensor]:
        """The member's weights by Network's parameter names (views: copy what must outlive the next epoch)."""
        table, row = self._where(slot_id)
        return unflatten(table.flat[row])

    def adam_state(self, slot_id: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The member's Adam moments (row views) and step count."""
        table, row = self._where(slot_id)
        return table.exp_avg[row], table.exp_avg_sq[row], int(table.steps[row])

    def network(self, slot_id: int) -> Network:
        """The member as a plain Network (a copy of its weights), on the engine's device."""
        network = Network().to(self.device)
        network.load_state_dict(self.weights(slot_id))
        return network

    def epochs(self, on_step: StepCallback | None = None) -> Iterator[dict[int, MemberResult]]:
        """One epoch for every member per iteration, until none is left; members join and leave in between.
        A member whose train loss is not finite has left when its NonFiniteLoss is yielded."""
        while self.slots:
            yield self.epoch(on_step)

    def epoch(self, on_step: StepCallback | None = None) -> dict[int, MemberResult]:
        started = time.perf_counter()
        tables = [t for t in self.tables.values() if t.k]
        # Every schedule is on its way before the first step, so no copy waits behind another table's steps.
        rows = [t.load_schedule(epoch_orders([self.slots[i].generator for i in t.ids], self.n)) for t in tables]
        for table, table_rows in zip(tables, rows):
            with self._stream(table):
                table.train_epoch(table_rows, self.data, self.forward, self.bf16, on_step if len(tables) == 1 else None)
        for stream in self._streams.values():
            torch.cuda.current_stream(self.device).wait_stream(stream)
        numbers = torch.cat([
            torch.stack([t.loss_sum[: t.k].double() / self.n, t.correct[: t.k].double() / self.n,
                         *(s.double() for s in t.evaluate(self.data, self.forward))])
            for t in tables
        ], dim=1).tolist()  # the epoch's one wait on the device
        ids = [i for t in tables for i in t.ids]
        # A member's share of the epoch: comparable with a run trained alone, whose share is the whole.
        seconds = (time.perf_counter() - started) / len(ids)
        results: dict[int, MemberResult] = {}
        for slot_id, (train_loss, train_accuracy, val_loss, val_accuracy) in zip(ids, zip(*numbers)):
            slot = self.slots[slot_id]
            slot.epoch += 1
            if not math.isfinite(train_loss):
                results[slot_id] = NonFiniteLoss(slot.epoch, train_loss)
                self.leave(slot_id)
                continue
            results[slot_id] = {"epoch": slot.epoch, "train_loss": train_loss, "train_accuracy": train_accuracy,
                                "val_loss": val_loss, "val_accuracy": val_accuracy, "epoch_time_s": seconds}
        return results
