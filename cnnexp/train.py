"""The classic loop, batch -> forward -> cross-entropy -> backward -> Adam step, epoch after epoch: `fit` is the
training engine (cnnexp.engine) with one slot, and a TrainingState is what it checkpoints and logs.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from cnnexp.config import TrainConfig, TuneConfig
from cnnexp.data import Split
from cnnexp.engine import Engine, Member, NonFiniteLoss
from cnnexp.slots import BETA1, BETA2, EPS, StepCallback
from cnnexp.fused import flatten, parameter_count
from cnnexp.model import Network

__all__ = ["BestEpoch", "NonFiniteLoss", "TrainingState", "fit", "new_training_state", "speed_options"]

EpochCallback = Callable[[dict], None]


@dataclass
class TrainingState:
    """Everything that determines the rest of a run: enough to checkpoint and resume it exactly.

    The model is the tutorial Network (what is logged and served); the Adam moments are flat rows in its
    parameter order. state_dict() keeps torch.optim.Adam's layout, so checkpoints written before the
    engine, by torch's own Adam, still resume.
    """

    model: Network
    lr: float
    generator: torch.Generator
    exp_avg: torch.Tensor = field(default_factory=lambda: torch.zeros(parameter_count()))
    exp_avg_sq: torch.Tensor = field(default_factory=lambda: torch.zeros(parameter_count()))
    steps: int = 0
    epoch: int = 0  # epochs completed

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self._adam_state_dict(),
            "generator": self.generator.get_state(),
            "epoch": self.epoch,
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        adam = state["optimizer"]
        moments = [adam["state"][i] for i in range(len(list(self.model.parameters())))] if adam["state"] else []
        zeros = torch.zeros(parameter_count())
        self.exp_avg = flatten([m["exp_avg"] for m in moments]) if moments else zeros
        self.exp_avg_sq = flatten([m["exp_avg_sq"] for m in moments]) if moments else zeros.clone()
        self.steps = int(moments[0]["step"]) if moments else 0
        self.lr = adam["param_groups"][0]["lr"]
        self.generator.set_state(state["generator"])
        self.epoch = state["epoch"]

    def _adam_state_dict(self) -> dict:
        params = list(self.model.parameters())
        moments = {}
        if self.steps:
            start = 0
            for i, p in enumerate(params):
                stop = start + p.numel()
                moments[i] = {"step": torch.tensor(float(self.steps)),
                              "exp_avg": self.exp_avg[start:stop].view_as(p).clone(),
                              "exp_avg_sq": self.exp_avg_sq[start:stop].view_as(p).clone()}
                start = stop
        group = {"lr": self.lr, "betas": (BETA1, BETA2), "eps": EPS, "weight_decay": 0.0, "amsgrad": False,
                 "maximize": False, "params": list(range(len(params)))}
        return {"state": moments, "param_groups": [group]}

    def take(self, engine: Engine, slot_id: int) -> None:
        """The member's weights, moments and progress after an epoch in the engine."""
        self.model.load_state_dict(engine.weights(slot_id))
        exp_avg, exp_avg_sq, self.steps = engine.adam_state(slot_id)
        self.exp_avg, self.exp_avg_sq = exp_avg.clone(), exp_avg_sq.clone()
        self.epoch = engine.slots[slot_id].epoch


class BestEpoch:
    """The epoch with the best val_accuracy so far and a CPU copy of its weights (Keras's
    ModelCheckpoint(save_best_only), in memory: the network is 33k parameters, 130 kB).

    Feed it every epoch; the trial runner keeps one per trial. state_dict() goes into the checkpoint,
    so a resumed run still knows the best epoch from before the interruption.
    """

    def __init__(self) -> None:
        self.epoch = 0  # 0: no epoch seen yet
        self.val_accuracy = -math.inf
        self.weights: dict[str, torch.Tensor] = {}

    def update(self, epoch: int, val_accuracy: float, model: nn.Module | Mapping[str, torch.Tensor]) -> bool:
        """Keeps this epoch if it beats the best so far; returns whether it did.

        A tie keeps the earlier epoch: it reached the same accuracy with less training. model may be
        a module or its state dict (an engine member's weights, Engine.weights).
        """
        if not val_accuracy > self.val_accuracy:
            return False
        weights = model.state_dict() if isinstance(model, nn.Module) else model
        self.epoch, self.val_accuracy = epoch, val_accuracy
        # A copy: the live tensors go on training (and may sit on a GPU).
        self.weights = {name: tensor.detach().to("cpu", copy=True) for name, tensor in weights.items()}
        return True

    def restore(self, model: nn.Module) -> nn.Module:
        """Loads the best epoch's weights into model (which keeps its device and memory format); returns it."""
        model.load_state_dict(self.weights)
        return model

    def summary(self) -> dict[str, float]:
        """The run-level metrics every train and trial run carries."""
        return {"best_val_accuracy": self.val_accuracy, "best_epoch": self.epoch}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "val_accuracy": self.val_accuracy, "weights": self.weights}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.val_accuracy, self.weights = state["epoch"], state["val_accuracy"], dict(state["weights"])


def new_training_state(lr: float, seed: int, device: torch.device) -> TrainingState:
    torch.manual_seed(seed)  # weight init
    model = Network().to(device)
    # Shuffling draws from its own generator so evaluation or logging cannot shift the batch order.
    return TrainingState(model, lr, torch.Generator().manual_seed(seed))


def speed_options(config: TrainConfig | TuneConfig) -> dict:
    """fit's keyword arguments from a TrainConfig or TuneConfig."""
    return {"bf16": config.bf16, "torch_compile": config.torch_compile}


def fit(
    state: TrainingState,
    train: Split,
    val: Split,
    *,
    batch_size: int,
    epochs: int,
    on_epoch_end: EpochCallback | None = None,
    on_batch_end: StepCallback | None = None,
    bf16: bool = False,
    torch_compile: bool = False,
) -> list[dict]:
    """Trains from state.epoch up to `epochs` in a one-slot engine; returns one metrics dict per epoch run here.

    state holds the result after every epoch (before on_epoch_end sees it). bf16 and torch_compile change
    how the step runs, not what it computes (bf16 rounds activations); both are off by default: on the CPU
    neither paid (benchmarks/README.md).
    """
    if state.epoch >= epochs:
        return []
    device = next(state.model.parameters()).device
    engine = Engine(1, train, val, device, bf16=bf16, torch_compile=torch_compile)
    slot = engine.join_state(Member(state.lr, batch_size), flatten(list(state.model.parameters())), state.exp_avg,
                             state.exp_avg_sq, state.steps, state.generator, state.epoch)
    history = []
    for results in engine.epochs(on_batch_end):
        result = results[slot]
        if isinstance(result, NonFiniteLoss):
            raise result
        state.take(engine, slot)
        history.append(result)
        if on_epoch_end is not None:
            on_epoch_end(result)
        if state.epoch >= epochs:
            break
    return history
