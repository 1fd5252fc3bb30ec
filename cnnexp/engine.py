"""The one training engine: members in the slots of a fixed capacity on the device, trained an epoch at a time.

A slot is one member (a trial, or `fit`'s one run); its weights, Adam moments, lr and step count are a
row of the table of its batch size (cnnexp.slots). Every member computes what it would alone: its own
init and shuffling generator (seeded as `fit` seeds them), its own batches, the gradient of its own
batch's mean loss and its own Adam update. Each epoch is data made once (cnnexp.schedule), so every step
has one shape; on CUDA each table's step is a captured graph, replayed: the host launches one graph per
step instead of ~60 kernels, and nothing waits on the device until the epoch's metrics are read.

The caller drives: `for results in engine.epochs(): ...`, with joins and leaves between epochs only.
"""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from cnnexp.data import Split
from cnnexp.fused import flatten, fused_forward, parameter_count, unflatten
from cnnexp.model import Network
from cnnexp.schedule import epoch_orders
from cnnexp.slots import CapturedTable, Computation, EagerTable, Resident, StepCallback, Table


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


class Engine:
    """Members in slots of batch-size tables; `epochs()` trains every member one epoch per iteration."""

    def __init__(self, capacity: int, train: Split, val: Split, device: torch.device, *, bf16: bool = False,
                 torch_compile: bool = False, graphs: bool | None = None, streams: bool = False):
        self.capacity, self.device = capacity, device
        # On CUDA, each batch-size table's steps on a stream of its own, side by side with the others'.
        self.streams = streams and device.type == "cuda"
        # Captured graphs and torch.compile do not nest; a compiled step runs eagerly.
        self.graphs = (device.type == "cuda" and not torch_compile) if graphs is None else graphs
        forward = torch.compile(fused_forward) if torch_compile else fused_forward
        self.computation = Computation(Resident.of(train, val, device), forward, bf16)
        self.n = len(train.labels)
        self.tables: dict[int, Table] = {}
        self.slots: dict[int, Slot] = {}
        self._next_id = 0
        self._streams: dict[int, torch.cuda.Stream] = {}  # by table key, made with the table, kept for the engine's life

    def _stream(self, key: int) -> contextlib.AbstractContextManager:
        if not self.streams:
            return contextlib.nullcontext()
        stream = self._streams[key]
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
        key = self._table_key(member)
        if key not in self.tables:
            self.tables[key] = (CapturedTable(key, self.capacity, self.n, self.device, self.computation) if self.graphs
                                else EagerTable(self.capacity, self.n, self.device, self.computation))
            if self.streams:
                self._streams[key] = torch.cuda.Stream(self.device)
        slot_id, self._next_id = self._next_id, self._next_id + 1
        self.tables[key].add(slot_id, member.batch_size, weights, exp_avg, exp_avg_sq, member.lr, steps)
        self.slots[slot_id] = Slot(member, generator, epoch)
        return slot_id

    def _table_key(self, member: Member) -> int:
        """A captured step has one shape, so a table per batch size; eager steps share one table (0)."""
        return member.batch_size if self.graphs else 0

    def leave(self, slot_id: int) -> None:
        self.tables[self._table_key(self.slots.pop(slot_id).member)].remove(slot_id)

    def _where(self, slot_id: int) -> tuple[Table, int]:
        table = self.tables[self._table_key(self.slots[slot_id].member)]
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
        A member whose train loss is not finite is reported as a NonFiniteLoss and stays: the caller decides
        (fit raises it, the trial runner fails the trial and frees its slot). Its rows are its own, so its
        NaNs reach no other member."""
        while self.slots:
            yield self.epoch(on_step)

    def epoch(self, on_step: StepCallback | None = None) -> dict[int, MemberResult]:
        started = time.perf_counter()
        keys = [key for key, t in self.tables.items() if t.k]
        tables = [self.tables[key] for key in keys]
        # Every schedule is on its way before the first step, so no copy waits behind another table's steps.
        for table in tables:
            table.start_epoch(epoch_orders([self.slots[i].generator for i in table.ids], self.n))
        for key, table in zip(keys, tables):
            with self._stream(key):
                table.train_epoch(on_step if len(tables) == 1 else None)
        for stream in self._streams.values():
            torch.cuda.current_stream(self.device).wait_stream(stream)
        numbers = torch.cat([
            torch.stack([t.loss_sum[: t.k].double() / self.n, t.correct[: t.k].double() / self.n,
                         *(s.double() for s in t.evaluate())])
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
                continue
            results[slot_id] = {"epoch": slot.epoch, "train_loss": train_loss, "train_accuracy": train_accuracy,
                                "val_loss": val_loss, "val_accuracy": val_accuracy, "epoch_time_s": seconds}
        return results
