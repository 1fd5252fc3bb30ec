"""The one training engine: members in the slots of a fixed capacity on the device, trained an epoch at a time.

A slot is one member (a trial, or `fit`'s one run). The engine owns its whole state: its weights, Adam
moments, lr and step count are a row of the table of its batch size (cnnexp.slots), its shuffling
generator and epoch count are the engine's own. The state goes in and comes out as one value, a
TrainingState: `join(state, batch_size)`, `state(slot)`, `leave(slot)`; a caller holds no other copy.
Every member computes what it would alone: its own init and shuffling generator, its own batches, the
gradient of its own batch's mean loss and its own Adam update. Each epoch is data made once
(cnnexp.schedule), so every step has one shape; on CUDA each table's step is a captured graph, replayed:
the host launches one graph per step instead of ~60 kernels, and nothing waits on the device until the
epoch's metrics are read.

The caller drives: `for results in engine.epochs(): ...`, with joins and leaves between epochs only. A
member whose loss diverged is reported, never removed: only the caller's `leave` frees a slot.
"""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from cnnexp.data import Split
from cnnexp.fused import fused_forward, unflatten
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
    """A slot's hyperparameters: its state's lr, and the batch size, which picks its table."""

    lr: float
    batch_size: int


@dataclass(frozen=True)
class TrainingState:
    """A member's whole state between epochs: everything that determines the rest of its run, so a run
    resumed from it goes on exactly. weights and Adam's moments are rows [P] in Network's parameter order
    (cnnexp.fused), on the device they were made on; generator draws each epoch's order. The engine copies it
    in and out, so a value never changes under its holder (cnnexp.checkpoint writes it in torch's layout)."""

    weights: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    steps: int  # Adam steps taken
    generator: torch.Generator
    epoch: int  # epochs completed
    lr: float

    def network(self) -> Network:
        """The weights as a plain Network (a copy) on their device: what is logged, served and scored."""
        with torch.device("meta"):  # no init: it would draw from the global RNG, and load_state_dict overwrites it
            network = Network()
        network = network.to_empty(device=self.weights.device)
        network.load_state_dict(unflatten(self.weights))
        return network


def _copied(generator: torch.Generator) -> torch.Generator:
    twin = torch.Generator(generator.device)
    twin.set_state(generator.get_state())
    return twin


@dataclass
class Slot:
    """What the engine keeps of a member beside its table row."""

    member: Member
    generator: torch.Generator
    epoch: int  # epochs completed


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

    def join(self, state: TrainingState, batch_size: int) -> int:
        """A member that goes on from `state` (a new one: cnnexp.train.new_training_state), trained at
        batch_size; its slot id. The state is copied in: the caller's value stays as it was."""
        if not self.free:
            raise ValueError(f"all {self.capacity} slots are taken")
        member = Member(state.lr, batch_size)
        key = self._table_key(member)
        if key not in self.tables:
            self.tables[key] = (CapturedTable(key, self.capacity, self.n, self.device, self.computation) if self.graphs
                                else EagerTable(self.capacity, self.n, self.device, self.computation))
            if self.streams:
                self._streams[key] = torch.cuda.Stream(self.device)
        slot_id, self._next_id = self._next_id, self._next_id + 1
        self.tables[key].add(slot_id, batch_size, state.weights, state.exp_avg, state.exp_avg_sq, state.lr, state.steps)
        self.slots[slot_id] = Slot(member, _copied(state.generator), state.epoch)
        return slot_id

    def _table_key(self, member: Member) -> int:
        """A captured step has one shape, so a table per batch size; eager steps share one table (0)."""
        return member.batch_size if self.graphs else 0

    def state(self, slot_id: int) -> TrainingState:
        """The member's state after its last epoch: a copy on the engine's device, which later epochs leave alone."""
        slot = self.slots[slot_id]
        table = self.tables[self._table_key(slot.member)]
        row = table.row(slot_id)
        return TrainingState(table.flat[row].clone(), table.exp_avg[row].clone(), table.exp_avg_sq[row].clone(),
                             int(table.steps[row]), _copied(slot.generator), slot.epoch, slot.member.lr)

    def leave(self, slot_id: int) -> TrainingState:
        """The member's state as it leaves; its slot is free for the next one to join."""
        state = self.state(slot_id)
        self.tables[self._table_key(self.slots.pop(slot_id).member)].remove(slot_id)
        return state

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
