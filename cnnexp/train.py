"""The classic loop, batch -> forward -> cross-entropy -> backward -> Adam step, epoch after epoch: `fit` is the
training engine (cnnexp.engine) with one slot, driven as the trial runner drives its slots: the state joins,
trains epoch by epoch, and comes out as a TrainingState, what a checkpoint holds and a model is made from.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from cnnexp.config import TrainConfig, TuneConfig
from cnnexp.data import Split
from cnnexp.engine import Engine, NonFiniteLoss, TrainingState
from cnnexp.fused import flatten, unflatten
from cnnexp.model import Network
from cnnexp.slots import StepCallback

__all__ = ["BestEpoch", "NonFiniteLoss", "TrainingState", "fit", "new_training_state", "speed_options"]

# on_epoch_end(metrics, state): an epoch's metrics and the state it left (a copy the caller may keep).
EpochCallback = Callable[[dict, TrainingState], None]


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

    def update(self, epoch: int, val_accuracy: float, state: TrainingState) -> bool:
        """Keeps this epoch's weights (state's, after it) if it beats the best so far; returns whether it did.
        A tie keeps the earlier epoch: it reached the same accuracy with less training."""
        if not val_accuracy > self.val_accuracy:
            return False
        self.epoch, self.val_accuracy = epoch, val_accuracy
        # By name, on the CPU: the layout of the checkpoints' "best" entry, and off a GPU that keeps training.
        self.weights = {name: tensor.to("cpu", copy=True) for name, tensor in unflatten(state.weights).items()}
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
    """A run at epoch 0: the tutorial Network's init under `seed`, Adam's moments at zero, on device."""
    torch.manual_seed(seed)  # weight init
    weights = flatten(list(Network().parameters())).to(device)
    # Shuffling draws from its own generator so evaluation or logging cannot shift the batch order.
    return TrainingState(weights, torch.zeros_like(weights), torch.zeros_like(weights), 0,
                         torch.Generator().manual_seed(seed), 0, lr)


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
) -> tuple[TrainingState, list[dict]]:
    """Trains state from its epoch up to `epochs` in a one-slot engine; returns the state after the last
    epoch and one metrics dict per epoch run here. A diverged epoch raises its NonFiniteLoss.

    bf16 and torch_compile change how the step runs, not what it computes (bf16 rounds activations); both
    are off by default: on the CPU neither paid (benchmarks/README.md).
    """
    if state.epoch >= epochs:
        return state, []
    engine = Engine(1, train, val, state.weights.device, bf16=bf16, torch_compile=torch_compile)
    slot = engine.join(state, batch_size)
    history = []
    for results in engine.epochs(on_batch_end):  # until the member leaves
        result = results[slot]
        if isinstance(result, NonFiniteLoss):
            raise result  # fit decides for its one member: training stops there
        history.append(result)
        state = engine.leave(slot) if result["epoch"] >= epochs else engine.state(slot)
        if on_epoch_end is not None:
            on_epoch_end(result, state)
    return state, history
