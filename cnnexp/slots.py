"""A table of slots: members as rows of flat buffers on the device, and their step.

Rows [0, k) hold the members; a member joins by writing into row k and leaves by clearing its row (the
last row moves into the hole), so nothing is reallocated when membership changes. A step trains every
row on its own micro-batch (cnnexp.schedule): forward, the gradient of each row's own loss (Table.gradients),
and the Adam update of each row whose batch is complete (Table.adam). Two tables run that step:

- CapturedTable (CUDA): one batch size, so every row steps at every step; the step over the first rows
  (the member count rounded up to a power of two; rows past the members step by 0) is captured once as a
  graph and replayed.
- EagerTable (the CPU): every batch size in one table, stepping eagerly over exactly the members: all K
  share each micro-batch's convolutions, which measured faster there than a table per batch size
  (docs/performance.md, the engine's table), and one input serves them when their orders are the same.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cnnexp.data import Split
from cnnexp.evaluate import EVAL_BATCH_SIZE
from cnnexp.fused import parameter_count, row_views
from cnnexp.model import to_inputs
from cnnexp.schedule import batch_weights, micro_size, padded_rows, stepping

# torch.optim.Adam's defaults, the tutorial's optimizer.
BETA1, BETA2, EPS = 0.9, 0.999, 1e-8
# Called on the host after each step of a one-table epoch: (step, the running sum of each row's loss on the device).
StepCallback = Callable[[int, torch.Tensor], None]


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


@dataclass(frozen=True)
class Computation:
    """What every step of an engine computes with: the resident data, the fused forward, and bf16 autocast."""

    data: Resident
    forward: Callable
    bf16: bool


class Table:
    """Members packed in rows [0, k), named by `ids` and of batch sizes `sizes`, in row order, with the
    gradient and Adam code both steps share. A subclass loads an epoch's schedule and trains it."""

    def __init__(self, capacity: int, n: int, device: torch.device, computation: Computation):
        self.capacity, self.n, self.device, self.computation = capacity, n, device, computation
        width = parameter_count()
        self.flat, self.exp_avg, self.exp_avg_sq = (torch.zeros(capacity, width, device=device) for _ in range(3))
        self.lr, self.steps = (torch.zeros(capacity, dtype=torch.float64, device=device) for _ in range(2))
        self.loss_sum = torch.zeros(capacity, device=device)
        self.correct = torch.zeros(capacity, dtype=torch.int64, device=device)
        self.ids: list[int] = []
        self.sizes: list[int] = []
        self._leaves: dict[int, list[torch.Tensor]] = {}

    @property
    def k(self) -> int:
        """How many members the table holds."""
        return len(self.ids)

    def _buffers(self) -> tuple[torch.Tensor, ...]:
        return self.flat, self.exp_avg, self.exp_avg_sq, self.lr, self.steps

    def add(self, slot_id: int, batch_size: int, params: torch.Tensor, exp_avg: torch.Tensor,
            exp_avg_sq: torch.Tensor, lr: float, steps: int) -> None:
        row = self.k
        for buffer, value in zip(self._buffers(), (params, exp_avg, exp_avg_sq, lr, steps)):
            buffer[row] = value
        self.ids.append(slot_id)
        self.sizes.append(batch_size)

    def remove(self, slot_id: int) -> None:
        row, last = self.ids.index(slot_id), self.k - 1
        for buffer in self._buffers():
            if row != last:
                buffer[row] = buffer[last]
            buffer[last] = 0  # a cleared row: zero weights give finite logits, and it steps by 0
        for names in (self.ids, self.sizes):
            names[row] = names[last]
            names.pop()

    def row(self, slot_id: int) -> int:
        return self.ids.index(slot_id)

    def _params(self, rows: int) -> list[torch.Tensor]:
        """Leaf views of rows [0, rows): autograd's gradients of them are each member's own."""
        if rows not in self._leaves:
            self._leaves[rows] = [view.detach().requires_grad_() for view in row_views(self.flat[:rows])]
        return self._leaves[rows]

    def gradients(self, r: int, batch_rows: torch.Tensor, loss_weights: torch.Tensor) -> torch.Tensor:
        """The gradient [r, P] of each of rows [0, r) on its micro-batch: batch_rows [r or 1, m] of the
        training split, loss_weights [r, m] or [m] (1/len of its batch, 0 = padding); the epoch's loss sums
        and hits grow."""
        data, params, m = self.computation.data, self._params(r), batch_rows.shape[1]
        if len(batch_rows) == 1:  # one order shared by every member: one input batch, conv1 over 6r channels
            x, y = data.train_x[batch_rows[0]], data.train_y[batch_rows[0]].expand(r, -1)
        else:  # [m, r, 28, 28]: member j's images are channel j, conv1's group j
            x = data.train_x.view(self.n, -1)[batch_rows.t()].view(m, r, *data.train_x.shape[2:])
            x = x.contiguous(memory_format=torch.channels_last) if x.device.type == "cpu" else x
            y = data.train_y[batch_rows]
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.computation.bf16):
            logits = self.computation.forward(params, x)  # [r, m, classes]
            losses = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(r, m)
        # Each member's weighted sum is its part of its batch's mean loss; the sum over members separates,
        # so each row's gradient is its own.
        grads = torch.autograd.grad((losses * loss_weights).sum(), params)
        valid = loss_weights > 0
        self.loss_sum[:r] += (losses.detach().float() * valid).sum(dim=1)
        self.correct[:r] += ((logits.detach().argmax(dim=2) == y) & valid).sum(dim=1)
        return torch.cat([g.reshape(r, -1) for g in grads], dim=1)

    @torch.no_grad()
    def adam(self, rows: slice | torch.Tensor, grad: torch.Tensor, step_size: torch.Tensor,
             correction2: torch.Tensor) -> None:
        """torch.optim.Adam's update of the rows named (a slice, or indices), each with its own factors."""
        whole = (self.flat, self.exp_avg, self.exp_avg_sq)
        w, m, v = (t[rows] for t in whole) if isinstance(rows, slice) else (t.index_select(0, rows) for t in whole)
        m.lerp_(grad, 1 - BETA1)
        v.mul_(BETA2).addcmul_(grad, grad, value=1 - BETA2)
        w.sub_(step_size.unsqueeze(1) * m / (v.sqrt() / correction2.unsqueeze(1)).add_(EPS))
        if not isinstance(rows, slice):  # index_select copied: write the rows back
            for target, part in zip(whole, (w, m, v)):
                target.index_copy_(0, rows, part)

    def adam_factors(self, steps_taken: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Adam's bias-corrected step size and second-moment correction [S, k] at each micro-batch, from each
        member's step count and steps_taken [S, k] (bool); the counts move on by the epoch's steps. Made with
        the schedule, since the counts are known ahead: a step is a dozen small kernels fewer."""
        k = self.k
        counts = self.steps[:k] + steps_taken.to(self.device, torch.float64).cumsum(dim=0).clamp(min=1)
        self.steps[:k] = counts[-1]
        # Bias corrections in float64, as Adam computes them from its step count.
        return (self.lr[:k] / (1 - BETA1**counts)).float(), (1 - BETA2**counts).sqrt().float()

    def start_epoch(self, orders: torch.Tensor) -> None:
        """The epoch's metrics zeroed and its schedule loaded from the members' orders [k, n]."""
        self.loss_sum.zero_()
        self.correct.zero_()
        self.load_schedule(orders)

    def load_schedule(self, orders: torch.Tensor) -> None:
        raise NotImplementedError

    def train_epoch(self, on_step: StepCallback | None) -> None:
        raise NotImplementedError

    @torch.inference_mode()
    def evaluate(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each member's mean validation loss and accuracy, on the device; chunks keep the activations of k
        members near one evaluation batch's."""
        k, x, y = self.k, self.computation.data.val_x, self.computation.data.val_y
        params = row_views(self.flat[:k])
        chunk = max(1, EVAL_BATCH_SIZE * (8 if self.device.type == "cuda" else 1) // k)
        logits = torch.cat([self.computation.forward(params, x[i : i + chunk]) for i in range(0, len(x), chunk)], dim=1)
        losses = F.cross_entropy(logits.flatten(0, 1), y.repeat(k), reduction="none").view(k, -1).mean(dim=1)
        return losses, (logits.argmax(dim=2) == y).double().mean(dim=1)


@dataclass(frozen=True)
class Plan:
    """An eager epoch: micro-batch s's rows [S, k or 1, m], loss weights [S, k, m] and who steps [S, k], with
    each row's Adam factors [S, k] (used where it steps)."""

    batch_rows: torch.Tensor
    loss_weights: torch.Tensor
    stepping: torch.Tensor
    step_size: torch.Tensor
    correction2: torch.Tensor
    every_row_steps: bool


class EagerTable(Table):
    """Any batch sizes, stepping on micro-batches of their greatest common divisor: a member whose batch spans
    several adds up their gradients and steps when its batch is complete."""

    def __init__(self, capacity: int, n: int, device: torch.device, computation: Computation):
        super().__init__(capacity, n, device, computation)
        self.grad_sum = torch.zeros(capacity, parameter_count(), device=device)
        self.plan: Plan | None = None

    def load_schedule(self, orders: torch.Tensor) -> None:
        micro = micro_size(self.sizes)
        steps_taken = stepping(self.n, self.sizes, micro)
        shared = all(torch.equal(order, orders[0]) for order in orders[1:])
        batch_rows = padded_rows(orders[:1] if shared else orders, micro).to(self.device)
        self.plan = Plan(batch_rows, batch_weights(self.n, self.sizes, micro).to(self.device), steps_taken,
                         *self.adam_factors(steps_taken), every_row_steps=bool(steps_taken.all()))

    def train_epoch(self, on_step: StepCallback | None) -> None:
        plan, k = self.plan, self.k
        for s in range(len(plan.batch_rows)):
            grad = self.gradients(k, plan.batch_rows[s], plan.loss_weights[s])
            if plan.every_row_steps:
                self.adam(slice(0, k), grad, plan.step_size[s], plan.correction2[s])
            else:
                self._step_complete_batches(grad, s)
            if on_step is not None:
                on_step(s, self.loss_sum[:k])

    def _step_complete_batches(self, grad: torch.Tensor, s: int) -> None:
        """Micro-batch s's gradients added to each member's sum; the members whose batch it completes step."""
        plan, k = self.plan, self.k
        self.grad_sum[:k] += grad
        rows = plan.stepping[s].nonzero().flatten().to(self.device)
        if len(rows):
            self.adam(rows, self.grad_sum.index_select(0, rows), plan.step_size[s].index_select(0, rows),
                      plan.correction2[s].index_select(0, rows))
            self.grad_sum.index_fill_(0, rows, 0)


class CapturedTable(Table):
    """One batch size, every row stepping at every step: a step of one shape, captured once as a CUDA graph
    per count of rows computed and replayed (off CUDA run uncaptured, so its schedule is testable anywhere).

    A graph reads its step's rows, loss weights and Adam factors from fixed addresses: each epoch's are copied
    in, and the step index is device data that the step itself advances.
    """

    def __init__(self, batch_size: int, capacity: int, n: int, device: torch.device, computation: Computation):
        super().__init__(capacity, n, device, computation)
        self.batch_size = batch_size
        self.loss_weights = batch_weights(n, [batch_size], batch_size)[:, 0].to(device)  # [S, b]
        steps = len(self.loss_weights)
        self.batch_rows = torch.zeros(steps, capacity, batch_size, dtype=torch.long, device=device)
        self.step_size, self.correction2 = (torch.zeros(steps, capacity, device=device) for _ in range(2))
        self.step_index = torch.zeros(1, dtype=torch.long, device=device)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}

    def computed_rows(self) -> int:
        """How many rows a step computes: the members rounded up to a power of two, so that a handful of
        graphs serve every count."""
        return min(self.capacity, 1 << (self.k - 1).bit_length())

    def load_schedule(self, orders: torch.Tensor) -> None:
        k = self.k
        step_size, correction2 = self.adam_factors(torch.ones(len(self.loss_weights), k, dtype=torch.bool))
        self.step_size[:, :k], self.correction2[:, :k] = step_size, correction2
        self.step_size[:, k:], self.correction2[:, k:] = 0, 1  # rows past the members step by 0
        rows = padded_rows(orders, self.batch_size)
        self.batch_rows[:, :k].copy_(rows.pin_memory() if self.device.type == "cuda" else rows, non_blocking=True)
        self.step_index.zero_()

    def train_epoch(self, on_step: StepCallback | None) -> None:
        r = self.computed_rows()
        replay = self._graph(r).replay if self.device.type == "cuda" else lambda: self._step(r)
        for s in range(len(self.loss_weights)):
            replay()
            if on_step is not None:
                on_step(s, self.loss_sum[: self.k])

    def _step(self, r: int) -> None:
        s = self.step_index
        grad = self.gradients(r, self.batch_rows.index_select(0, s)[0, :r], self.loss_weights.index_select(0, s)[0])
        self.adam(slice(0, r), grad, *(t.index_select(0, s)[0, :r] for t in (self.step_size, self.correction2)))
        s += 1

    def _graph(self, r: int) -> torch.cuda.CUDAGraph:
        """The step over rows [0, r), captured once; warm-up steps run on copies' behalf and are undone."""
        if r not in self._graphs:
            touched = (*self._buffers(), self.loss_sum, self.correct, self.step_index)
            kept = [t.clone() for t in touched]
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):  # cuDNN and cuBLAS choose and allocate before capture
                    self.step_index.zero_()  # an epoch may be one step: never read past its schedule
                    self._step(r)
            torch.cuda.current_stream(self.device).wait_stream(side)
            self.step_index.zero_()
            # Its own memory pool. One table's graphs (a few r, replayed one after another on its stream,
            # keeping nothing in the pool between replays) could share one; graphs of different tables, replayed
            # at once on their streams, must not. Sharing within a table is left until a GPU measures the memory
            # at --cohort 64 and checks the replays.
            graph = torch.cuda.CUDAGraph()
            # thread_local: the tracking and heartbeat threads' own CUDA calls, if any, do not void the capture.
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self._step(r)
            for tensor, value in zip(touched, kept):
                tensor.copy_(value)
            self._graphs[r] = graph
        return self._graphs[r]
