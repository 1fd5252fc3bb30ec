"""The classic loop: batch -> forward -> cross-entropy -> backward -> Adam step, epoch after epoch."""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cnnexp.config import TrainConfig, TuneConfig
from cnnexp.data import Split
from cnnexp.evaluate import predict, score
from cnnexp.model import Network, to_inputs

EpochCallback = Callable[[dict], None]
BatchCallback = Callable[[int, torch.Tensor], None]


class NonFiniteLoss(ArithmeticError):
    """Training diverged; carries the epoch so callers can say where."""

    def __init__(self, epoch: int, loss: float):
        super().__init__(f"training loss became {loss} in epoch {epoch}; try a smaller lr")
        self.epoch = epoch


@dataclass
class TrainingState:
    """Everything that determines the rest of a run: enough to checkpoint and resume it exactly."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    epoch: int = 0  # epochs completed

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "epoch": self.epoch,
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.epoch = state["epoch"]


class BestEpoch:
    """The epoch with the best val_accuracy so far and a CPU copy of its weights (Keras's
    ModelCheckpoint(save_best_only), in memory: the network is 33k parameters, 130 kB).

    Feed it every epoch; a fused cohort keeps one per member. state_dict() goes into the checkpoint,
    so a resumed run still knows the best epoch from before the interruption.
    """

    def __init__(self) -> None:
        self.epoch = 0  # 0: no epoch seen yet
        self.val_accuracy = -math.inf
        self.weights: dict[str, torch.Tensor] = {}

    def update(self, epoch: int, val_accuracy: float, model: nn.Module | Mapping[str, torch.Tensor]) -> bool:
        """Keeps this epoch if it beats the best so far; returns whether it did.

        A tie keeps the earlier epoch: it reached the same accuracy with less training. model may be
        a module or its state dict (a cohort member's slice of the fused weights).
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
    if device.type == "cpu":
        # oneDNN's NHWC kernels for conv and max-pool beat NCHW ones on CPU (benchmarks/README.md).
        model = model.to(memory_format=torch.channels_last)
    # One fused kernel per step instead of ~10 small ops per parameter; the same Adam update.
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, fused=_fused_adam_supported(device) or None)
    # Shuffling draws from its own generator so evaluation or logging cannot shift the batch order.
    generator = torch.Generator().manual_seed(seed)
    return TrainingState(model, optimizer, generator)


def _fused_adam_supported(device: torch.device) -> bool:
    return device.type in ("cpu", "cuda")


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The split, resident on the device for the whole fit; to a GPU from pinned memory, asynchronously."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def train_epoch(
    state: TrainingState,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    on_batch_end: BatchCallback | None = None,
    *,
    forward: nn.Module | None = None,
    bf16: bool = False,
) -> tuple[float, float]:
    """One pass over a shuffled copy of the resident split; returns mean loss and accuracy.

    forward: what computes the logits, state.model by default (fit passes its torch.compile'd wrapper,
    which shares the parameters); bf16: bfloat16 autocast of forward and loss (weights and Adam stay fp32).
    """
    model, optimizer = state.model if forward is None else forward, state.optimizer
    model.train()
    order = torch.randperm(len(labels), generator=state.generator).to(inputs.device)
    # Sums stay on the device so the loop never waits for a metric.
    loss_sum = torch.zeros((), device=inputs.device)
    correct = torch.zeros((), dtype=torch.int64, device=inputs.device)
    for batch, start in enumerate(range(0, len(labels), batch_size)):
        # Gathering each batch, not a shuffled copy of the whole split, halves the epoch's memory traffic.
        rows = order[start : start + batch_size]
        x, y = inputs[rows], labels[rows]
        with torch.autocast(inputs.device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
            loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach() * len(y)
        correct += (logits.detach().argmax(dim=1) == y).sum()
        if on_batch_end is not None:
            on_batch_end(batch, loss)
    return loss_sum.item() / len(labels), correct.item() / len(labels)


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
    on_batch_end: BatchCallback | None = None,
    bf16: bool = False,
    torch_compile: bool = False,
) -> list[dict]:
    """Trains from state.epoch up to `epochs`; returns one metrics dict per epoch run here.

    bf16 and torch_compile change how the step runs, not what it computes (bf16 rounds activations);
    both are off by default: on the CPU neither paid (benchmarks/README.md).
    """
    device = next(state.model.parameters()).device
    if device.type == "cuda":
        # Every step has the same shapes (bar the last batch): cuDNN's autotuned kernels pay after a few steps.
        torch.backends.cudnn.benchmark = True
    # The wrapper shares state.model's parameters; state.model stays the plain module that is
    # checkpointed, evaluated and logged.
    forward = torch.compile(state.model) if torch_compile else state.model
    train_x, train_y = to_inputs(to_device(train.images, device)), to_device(train.labels, device)
    val_x, val_y = to_inputs(to_device(val.images, device)), to_device(val.labels, device)
    history = []
    while state.epoch < epochs:
        epoch = state.epoch + 1
        started = time.perf_counter()
        train_loss, train_accuracy = train_epoch(state, train_x, train_y, batch_size, on_batch_end,
                                                 forward=forward, bf16=bf16)
        if not math.isfinite(train_loss):
            raise NonFiniteLoss(epoch, train_loss)
        val_scores = score(predict(state.model, val_x), val_y)
        state.epoch = epoch
        metrics = {
            "epoch": epoch,
            "train_loss": train_loss,
            "train_accuracy": train_accuracy,
            "val_loss": val_scores["loss"],
            "val_accuracy": val_scores["accuracy"],
            "epoch_time_s": time.perf_counter() - started,
        }
        history.append(metrics)
        if on_epoch_end is not None:
            on_epoch_end(metrics)
    return history
