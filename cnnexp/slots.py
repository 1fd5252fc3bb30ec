"""A table of slots: the members of one batch size as rows of flat buffers on the device, and their step.

Rows [0, k) hold the members; a member joins by writing into row k and leaves by clearing its row (the
last row moves into the hole), so nothing is reallocated when membership changes. A step trains every
row on its own batch (cnnexp.schedule): forward, the gradient of each row's own mean loss, and each
row's own Adam update. On CUDA the step over the first k rows, k rounded up to a power of two, is
captured once as a graph and replayed (rows past the members step by 0); on the CPU it runs eagerly
over exactly the members, with one shared input when every member's order is the same.
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
from cnnexp.schedule import batch_weights, padded_rows

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
        # Adam's bias-corrected step size and second-moment correction for each step of the epoch and row,
        # made with the schedule: the step count is known ahead, and a step is a dozen small kernels fewer.
        self.step_size, self.correction2 = (torch.zeros(len(self.weights), capacity, device=device) for _ in range(2))
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

    def step(self, k: int, rows: torch.Tensor, weights: torch.Tensor, valid: torch.Tensor, step_size: torch.Tensor,
             correction2: torch.Tensor, data: Resident, forward: Callable, bf16: bool) -> None:
        """One batch for rows [0, k): rows [k or 1, b] of the training split, weights [b] (1/len, 0 = padding),
        and each row's Adam factors [k] for this step."""
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
        self._adam(k, torch.cat([g.reshape(k, -1) for g in grads], dim=1), step_size, correction2)
        self.loss_sum[:k] += (losses.detach().float() * valid).sum(dim=1)
        self.correct[:k] += ((logits.detach().argmax(dim=2) == y) & valid).sum(dim=1)

    @torch.no_grad()
    def _adam(self, k: int, grad: torch.Tensor, step_size: torch.Tensor, correction2: torch.Tensor) -> None:
        """torch.optim.Adam's update for rows [0, k), each with its own lr and step count (cleared rows: step 0)."""
        w, m, v = self.flat[:k], self.exp_avg[:k], self.exp_avg_sq[:k]
        m.lerp_(grad, 1 - BETA1)
        v.mul_(BETA2).addcmul_(grad, grad, value=1 - BETA2)
        w.sub_(step_size.unsqueeze(1) * m / (v.sqrt() / correction2.unsqueeze(1)).add_(EPS))

    def _adam_factors(self) -> None:
        """The epoch's Adam factors per step and row, from each member's step count; the counts move on by the
        epoch's steps. Rows past the members step by 0 (and divide by 1)."""
        k, steps = self.k, len(self.weights)
        counts = self.steps[:k, None] + torch.arange(1, steps + 1, dtype=torch.float64, device=self.device)
        # Bias corrections in float64, as Adam computes them from its step count.
        self.step_size[:, :k] = (self.lr[:k, None] / (1 - BETA1**counts)).t().float()
        self.correction2[:, :k] = (1 - BETA2**counts).sqrt().t().float()
        self.step_size[:, k:] = 0
        self.correction2[:, k:] = 1
        self.steps[:k] += steps

    def load_schedule(self, orders: torch.Tensor) -> torch.Tensor | None:
        """Copies the epoch's rows into the graphs' buffer (returns None), or returns them for eager steps."""
        self.loss_sum.zero_()
        self.correct.zero_()
        self._adam_factors()
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
                self.step(k, rows[s], self.weights[s], self.valid[s], self.step_size[s, :k], self.correction2[s, :k],
                          data, forward, bf16)
            if on_step is not None:
                on_step(s, self.loss_sum[: self.k])

    def _graph_step(self, k: int, data: Resident, forward: Callable, bf16: bool) -> None:
        s = self.step_index
        rows = self.rows.index_select(0, s)[0, :k]
        self.step(k, rows, *(t.index_select(0, s)[0] for t in (self.weights, self.valid)),
                  *(t.index_select(0, s)[0, :k] for t in (self.step_size, self.correction2)), data, forward, bf16)
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
