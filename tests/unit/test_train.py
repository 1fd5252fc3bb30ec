
import dataclasses

import pytest
import torch

from cnnexp.checkpoint import from_state_dict, to_state_dict
from cnnexp.config import ConfigError
from cnnexp.devices import resolve_device
from cnnexp.train import BestEpoch, NonFiniteLoss, fit, new_training_state
from helpers import CPU, tensor_split

@pytest.fixture(scope="module")
def splits():
    return tensor_split(300, 1), tensor_split(100, 2)


def _fit(splits, epochs=2, seed=0, **kwargs):
    return fit(new_training_state(lr=0.01, seed=seed, device=CPU), *splits, batch_size=50, epochs=epochs, **kwargs)


def test_fit_returns_one_entry_per_epoch_and_learns(splits):
    _, history = _fit(splits, epochs=3)
    assert [m["epoch"] for m in history] == [1, 2, 3]
    assert set(history[0]) == {"epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "epoch_time_s"}
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["val_accuracy"] > 0.5  # chance is 0.1


def test_same_seed_same_metrics_other_seed_other_metrics(splits):
    def without_time(history):
        return [{k: v for k, v in m.items() if k != "epoch_time_s"} for m in history]

    a, b, c = (without_time(_fit(splits, seed=s)[1]) for s in (0, 0, 1))
    assert a == b and a != c


def test_callbacks_see_every_epoch_and_batch(splits):
    epochs, batches = [], []
    states = []
    _fit(splits, on_epoch_end=lambda m, s: (epochs.append(m), states.append(s)),
         on_batch_end=lambda i, loss: batches.append(i))
    assert [m["epoch"] for m in epochs] == [1, 2] == [s.epoch for s in states]
    assert [s.steps for s in states] == [6, 12]  # each epoch's state, kept unchanged by the next epoch
    assert batches == list(range(6)) * 2


def test_resuming_from_a_state_dict_matches_an_uninterrupted_run(splits):
    _, straight = _fit(splits, epochs=3)
    first, _ = _fit(splits, epochs=1)
    _, rest = fit(from_state_dict(to_state_dict(first), CPU), *splits, batch_size=50, epochs=3)
    strip = lambda ms: [(m["epoch"], m["train_loss"], m["val_accuracy"]) for m in ms]  # noqa: E731
    assert strip(rest) == strip(straight[1:])


def test_best_epoch_keeps_a_copy_of_the_best_weights_and_survives_a_state_dict(splits):
    state, best = new_training_state(lr=0.01, seed=0, device=CPU), BestEpoch()
    assert best.update(1, 0.5, state) and not best.update(2, 0.5, state)  # a tie keeps the earlier
    kept = state.network().fc1.weight.detach().clone()
    trained, _ = fit(state, *splits, batch_size=50, epochs=1)  # training moves on; the copy does not
    assert not torch.equal(trained.network().fc1.weight, kept) and torch.equal(best.weights["fc1.weight"], kept)
    assert torch.equal(state.network().fc1.weight, kept)  # nor does the value fit started from
    assert best.update(3, 0.7, trained)
    again = BestEpoch()
    again.load_state_dict(best.state_dict())
    assert again.summary() == {"best_val_accuracy": 0.7, "best_epoch": 3}
    other = new_training_state(lr=0.01, seed=1, device=CPU)
    assert torch.equal(again.restore(other.network()).fc1.weight, trained.network().fc1.weight)


def test_nan_loss_stops_training_with_the_epoch(splits):
    state = new_training_state(lr=0.01, seed=0, device=CPU)
    state = dataclasses.replace(state, weights=torch.full_like(state.weights, float("nan")))
    with pytest.raises(NonFiniteLoss, match="epoch 1"):
        fit(state, *splits, batch_size=50, epochs=3)


def test_checkpoints_keep_torch_adams_layout_both_ways(splits):
    """Checkpoints written before the engine hold torch.optim.Adam's state dict: they load, and new ones
    load into torch's Adam."""
    model = new_training_state(lr=0.02, seed=0, device=CPU).network()
    adam = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(3):
        adam.zero_grad()
        model(torch.rand(8, 1, 28, 28)).square().mean().backward()
        adam.step()
    old = {"model": model.state_dict(), "optimizer": adam.state_dict(), "generator": torch.Generator().get_state(),
           "epoch": 1}
    state = from_state_dict(old, CPU)
    assert (state.lr, state.steps, state.epoch) == (0.02, 3, 1)
    first = adam.state_dict()["state"][0]["exp_avg"]
    assert torch.equal(state.exp_avg[: first.numel()], first.flatten())
    again = torch.optim.Adam(state.network().parameters(), lr=1.0)
    again.load_state_dict(to_state_dict(state)["optimizer"])
    for p, q in zip(again.state_dict()["state"].values(), adam.state_dict()["state"].values()):
        assert torch.equal(p["exp_avg_sq"], q["exp_avg_sq"]) and float(p["step"]) == 3
    assert again.param_groups[0]["lr"] == 0.02
    state, _ = fit(state, *splits, batch_size=50, epochs=2)  # and training goes on from there
    assert state.steps == 3 + 6


def test_device_resolution_picks_the_best_available_and_refuses_an_absent_one(monkeypatch):
    assert resolve_device("cpu") == CPU
    with pytest.raises(ConfigError, match="device"):
        resolve_device("tpu")
    # auto's order, decided by what is available, not by this machine.
    for cuda, mps, expected in ((True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
        monkeypatch.setattr("cnnexp.devices._mps_available", lambda mps=mps: mps)
        assert resolve_device("auto").type == expected
    with pytest.raises(ConfigError, match="device: cuda was asked for but is not available"):
        resolve_device("cuda")


def test_bf16_autocast_learns_and_keeps_weights_and_adam_in_fp32(splits):
    state, history = _fit(splits, epochs=3, bf16=True)
    _, plain = _fit(splits, epochs=3)
    assert history[0]["train_loss"] != plain[0]["train_loss"]  # autocast ran: bf16 rounds activations
    assert history[-1]["val_accuracy"] > 0.5
    assert state.weights.dtype == torch.float32
    assert state.exp_avg.dtype == state.exp_avg_sq.dtype == torch.float32


@pytest.mark.slow  # compiling takes 10-30 s on CPU
def test_torch_compile_computes_the_same_step_and_keeps_the_state_dict_plain(splits):
    compiled_state, compiled = _fit(splits, epochs=1, torch_compile=True)
    _, plain = _fit(splits, epochs=1)
    assert compiled[0]["train_loss"] == pytest.approx(plain[0]["train_loss"], rel=1e-3)
    assert not any(key.startswith("_orig_mod") for key in to_state_dict(compiled_state)["model"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_fit_on_cuda_learns_what_it_learns_on_the_cpu(splits):
    """The same run on both devices: the same trajectory up to float rounding (TF32 off, so cuDNN's
    convolutions round as the CPU's do), weights and Adam state on the GPU, a plain Network to log."""
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        state, history = fit(new_training_state(lr=0.01, seed=0, device=torch.device("cuda")), *splits,
                             batch_size=50, epochs=2)
    finally:
        torch.backends.cudnn.allow_tf32 = saved
    cpu_state, cpu_history = _fit(splits)
    for got, want in zip(history, cpu_history):
        for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
            assert got[key] == pytest.approx(want[key], abs=1e-3), key
    assert state.weights.is_cuda and state.exp_avg.is_cuda and state.steps == cpu_state.steps == 12
    for name, tensor in state.network().state_dict().items():
        want = cpu_state.network().state_dict()[name]
        assert ((tensor.cpu() - want).norm() / want.norm()).item() < 1e-3, name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_fit_on_cuda_with_bf16_and_compile_learns(splits):
    state = new_training_state(lr=0.01, seed=0, device=torch.device("cuda"))
    _, history = fit(state, *splits, batch_size=50, epochs=2, bf16=True, torch_compile=True)
    assert history[-1]["val_accuracy"] > 0.3
