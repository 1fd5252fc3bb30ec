"""A table of slots: members as rows of flat buffers on the device, and their step.

Rows [0, k) hold the members; a member joins by writing into row k and leaves by clearing its row (the
last row moves into the hole), so nothing is reallocated when membership changes. A step trains every
row on its own micro-batch (cnnexp.schedule): forward, the gradient of each row's own loss, and the Adam
update of each row whose batch is complete. On CUDA a table holds one batch size, so every row steps at
every step, and the step over the first k rows (k rounded up to a power of two; rows past the members
step by 0) is captured once as a graph and replayed. On the CPU one table holds every batch size and
steps eagerly over exactly the members: all K share each micro-batch's convolutions, which measured
faster there than a table per batch size (docs/performance.md, the engine's table), and one input serves them when their
orders are the same.
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
class Plan:
    """An eager epoch: micro-batch s's rows [S, k or 1, m], weights [S, k, m] and who steps [S, k], with each
    row's Adam factors [S, k] (used where it steps)."""

    rows: torch.Tensor
    weights: torch.Tensor
    stepping: torch.Tensor
    step_size: torch.Tensor
    correction2: torch.Tensor
    every_row_steps: bool


class Table:
    """Members packed in rows [0, k), named by `ids` and of batch sizes `sizes`, in row order."""

    def __init__(self, capacity: int, n: int, device: torch.device, graph_batch: int | None = None):
        """graph_batch: the one batch size of a table whose step is captured (CUDA); None: eager, any sizes."""
        self.capacity, self.n, self.device = capacity, n, device
        width = parameter_count()
        self.flat, self.exp_avg, self.exp_avg_sq = (torch.zeros(capacity, width, device=device) for _ in range(3))
        self.lr, self.steps = (torch.zeros(capacity, dtype=torch.float64, device=device) for _ in range(2))
        self.loss_sum = torch.zeros(capacity, device=device)
        self.correct = torch.zeros(capacity, dtype=torch.int64, device=device)
        self.ids: list[int] = []
        self.sizes: list[int] = []
        self._leaves: dict[int, list[torch.Tensor]] = {}
        self.graph_batch = graph_batch
        # Gradients of members whose batch spans several micro-batches, summed until it is complete.
        self.grad_sum = torch.zeros(capacity, width, device=device) if graph_batch is None else None
        if graph_batch is not None:
            # A graph reads its step's rows, weights and Adam factors from fixed addresses: each epoch's are
            # copied in, and the step index is device data that the step itself advances.
            self.weights = batch_weights(n, [graph_batch], graph_batch)[:, 0].to(device)  # [S, b]
            steps = len(self.weights)
            self.rows = torch.zeros(steps, capacity, graph_batch, dtype=torch.long, device=device)
            self.step_size, self.correction2 = (torch.zeros(steps, capacity, device=device) for _ in range(2))
            self.step_index = torch.zeros(1, dtype=torch.long, device=device)
            self._graphs: dict[int, torch.cuda.CUDAGraph] = {}

    @property
    def k(self) -> int:
        return len(self.ids)

    def _buffers(self) -> tuple[torch.Tensor, ...]:
        return self.flat, self.exp_avg, self.exp_avg_sq, self.lr, self.steps

    def add(self, slot_id: int, batch_size: int, weights: torch.Tensor, exp_avg: torch.Tensor,
            exp_avg_sq: torch.Tensor, lr: float, steps: int) -> None:
        row = self.k
        for buffer, value in zip(self._buffers(), (weights, exp_avg, exp_avg_sq, lr, steps)):
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

    def rows_run(self) -> int:
        """How many rows a step computes: exactly the members when eager; when captured a power of two, so
        that a handful of graphs serve every count."""
        if self.graph_batch is None:
            return self.k
        return min(self.capacity, 1 << (self.k - 1).bit_length())

    def _params(self, k: int) -> list[torch.Tensor]:
        """Leaf views of rows [0, k): autograd's gradients of them are each member's own."""
        if k not in self._leaves:
            self._leaves[k] = [view.detach().requires_grad_() for view in row_views(self.flat[:k])]
        return self._leaves[k]

    def _gradients(self, k: int, rows: torch.Tensor, weights: torch.Tensor, data: Resident, forward: Callable,
                   bf16: bool) -> torch.Tensor:
        """Each of rows [0, k)'s gradient [k, P] on its micro-batch: rows [k or 1, m] of the training split,
        weights [k, m] or [m] (1/len of its batch, 0 = padding); the epoch's loss sums and hits grow."""
        params, m = self._params(k), rows.shape[1]
        if len(rows) == 1:  # one order shared by every member: one input batch, conv1 over 6k channels
            x, y = data.train_x[rows[0]], data.train_y[rows[0]].expand(k, -1)
        else:  # [m, k, 28, 28]: member j's images are channel j, conv1's group j
            x = data.train_x.view(self.n, -1)[rows.t()].view(m, k, *data.train_x.shape[2:])
            x = x.contiguous(memory_format=torch.channels_last) if x.device.type == "cpu" else x
            y = data.train_y[rows]
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = forward(params, x)  # [k, m, classes]
            losses = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(k, m)
        # Each member's weighted sum is its part of its batch's mean loss; the sum over members separates,
        # so each row's gradient is its own.
        grads = torch.autograd.grad((losses * weights).sum(), params)
        valid = weights > 0
        self.loss_sum[:k] += (losses.detach().float() * valid).sum(dim=1)
        self.correct[:k] += ((logits.detach().argmax(dim=2) == y) & valid).sum(dim=1)
        return torch.cat([g.reshape(k, -1) for g in grads], dim=1)

    @torch.no_grad()
    def _adam(self, rows: slice | torch.Tensor, grad: torch.Tensor, step_size: torch.Tensor,
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

    def _adam_factors(self, steps_taken: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Adam's bias-corrected step size and second-moment correction [S, k] at each micro-batch, from each
        member's step count and steps_taken [S, k] (bool); the counts move on by the epoch's steps. Made with
        the schedule, since the counts are known ahead: a step is a dozen small kernels fewer."""
        k = self.k
        counts = self.steps[:k] + steps_taken.to(self.device, torch.float64).cumsum(dim=0).clamp(min=1)
        self.steps[:k] = counts[-1]
        # Bias corrections in float64, as Adam computes them from its step count.
        return (self.lr[:k] / (1 - BETA1**counts)).float(), (1 - BETA2**counts).sqrt().float()

    def load_schedule(self, orders: torch.Tensor) -> Plan | None:
        """The epoch's plan for eager steps, or (captured) its rows and factors copied into the graph's buffers."""
        self.loss_sum.zero_()
        self.correct.zero_()
        if self.graph_batch is None:
            micro = micro_size(self.sizes)
            steps_taken = stepping(self.n, self.sizes, micro)
            shared = all(torch.equal(order, orders[0]) for order in orders[1:])
            rows = padded_rows(orders[:1] if shared else orders, micro).to(self.device)
            return Plan(rows, batch_weights(self.n, self.sizes, micro).to(self.device), steps_taken,
                        *self._adam_factors(steps_taken), every_row_steps=bool(steps_taken.all()))
        k = self.k
        step_size, correction2 = self._adam_factors(torch.ones(len(self.weights), k, dtype=torch.bool))
        self.step_size[:, :k], self.correction2[:, :k] = step_size, correction2
        self.step_size[:, k:], self.correction2[:, k:] = 0, 1  # rows past the members step by 0
        rows = padded_rows(orders, self.graph_batch)
        self.rows[:, :k].copy_(rows.pin_memory() if self.device.type == "cuda" else rows, non_blocking=True)
        self.step_index.zero_()
        return None

    def train_epoch(self, plan: Plan | None, data: Resident, forward: Callable, bf16: bool,
                    on_step: StepCallback | None) -> None:
        if plan is None:
            k = self.rows_run()
            # Off CUDA the captured path's steps run uncaptured, so its schedule is testable anywhere.
            replay = (self._graph(k, data, forward, bf16).replay if self.device.type == "cuda"
                      else lambda: self._graph_step(k, data, forward, bf16))
            for s in range(len(self.weights)):
                replay()
                if on_step is not None:
                    on_step(s, self.loss_sum[: self.k])
            return
        k = self.k
        for s in range(len(plan.rows)):
            grad = self._gradients(k, plan.rows[s], plan.weights[s], data, forward, bf16)
            if plan.every_row_steps:
                self._adam(slice(0, k), grad, plan.step_size[s], plan.correction2[s])
            else:
                self.grad_sum[:k] += grad
                rows = plan.stepping[s].nonzero().flatten().to(self.device)
                if len(rows):
                    self._adam(rows, self.grad_sum.index_select(0, rows), plan.step_size[s].index_select(0, rows),
                               plan.correction2[s].index_select(0, rows))
                    self.grad_sum.index_fill_(0, rows, 0)
            if on_step is not None:
                on_step(s, self.loss_sum[:k])

    def _graph_step(self, k: int, data: Resident, forward: Callable, bf16: bool) -> None:
        s = self.step_index
        rows = self.rows.index_select(0, s)[0, :k]
        grad = self._gradients(k, rows, self.weights.index_select(0, s)[0], data, forward, bf16)
        self._adam(slice(0, k), grad, *(t.index_select(0, s)[0, :k] for t in (self.step_size, self.correction2)))
        s += 1

    def _graph(self, k: int, data: Resident, forward: Callable, bf16: bool) -> torch.cuda.CUDAGraph:
        """The step over rows [0, k), captured once; warm-up steps run on copies' behalf and are undone."""
        if k not in self._graphs:
            kept = [t.clone() for t in (*self._buffers(), self.loss_sum, self.correct, self.step_index)]
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):  # cuDNN and cuBLAS choose and allocate before capture
                    self.step_index.zero_()  # an epoch may be one step: never read past its schedule
                    self._graph_step(k, data, forward, bf16)
            torch.cuda.current_stream(self.device).wait_stream(side)
            self.step_index.zero_()
            # Its own memory pool. One table's graphs (a few k, replayed one after another on its stream,
            # keeping nothing in the pool between replays) could share one; graphs of different tables, replayed
            # at once on their streams, must not. Sharing within a table is left until a GPU measures the memory
            # at --cohort 64 and checks the replays.
            graph = torch.cuda.CUDAGraph()
            # thread_local: the tracking and heartbeat threads' own CUDA calls, if any, do not void the capture.
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
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
