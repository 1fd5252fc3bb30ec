
import pytest
import torch

from cnnexp.config import ConfigError
from cnnexp.devices import resolve_device
from cnnexp.train import BestEpoch, NonFiniteLoss, fit, new_training_state
from helpers import CPU, tensor_split

@pytest.fixture(scope="module")
def splits():
    return tensor_split(300, 1), tensor_split(100, 2)


def _fit(splits, epochs=2, seed=0, **kwargs):
    state = new_training_state(lr=0.01, seed=seed, device=CPU)
    return state, fit(state, *splits, batch_size=50, epochs=epochs, **kwargs)


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
    _fit(splits, on_epoch_end=epochs.append, on_batch_end=lambda i, loss: batches.append(i))
    assert [m["epoch"] for m in epochs] == [1, 2]
    assert batches == list(range(6)) * 2


def test_resuming_from_a_state_dict_matches_an_uninterrupted_run(splits):
    _, straight = _fit(splits, epochs=3)
    first, _ = _fit(splits, epochs=1)
    resumed = new_training_state(lr=0.01, seed=123, device=CPU)
    resumed.load_state_dict(first.state_dict())
    rest = fit(resumed, *splits, batch_size=50, epochs=3)
    strip = lambda ms: [(m["epoch"], m["train_loss"], m["val_accuracy"]) for m in ms]  # noqa: E731
    assert strip(rest) == strip(straight[1:])


def test_best_epoch_keeps_a_copy_of_the_best_weights_and_survives_a_state_dict(splits):
    state, best = new_training_state(lr=0.01, seed=0, device=CPU), BestEpoch()
    assert best.update(1, 0.5, state.model) and not best.update(2, 0.5, state.model)  # a tie keeps the earlier
    kept = state.model.fc1.weight.detach().clone()
    fit(state, *splits, batch_size=50, epochs=1)  # training moves on; the copy does not
    assert not torch.equal(state.model.fc1.weight, kept) and torch.equal(best.weights["fc1.weight"], kept)
    assert best.update(3, 0.7, state.model.state_dict())  # a state dict does as well as a module
    again = BestEpoch()
    again.load_state_dict(best.state_dict())
    assert again.summary() == {"best_val_accuracy": 0.7, "best_epoch": 3}
    other = new_training_state(lr=0.01, seed=1, device=CPU)
    assert torch.equal(again.restore(other.model).fc1.weight, state.model.fc1.weight)


def test_nan_loss_stops_training_with_the_epoch(splits):
    state = new_training_state(lr=0.01, seed=0, device=CPU)
    with torch.no_grad():
        state.model.fc1.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteLoss, match="epoch 1"):
        fit(state, *splits, batch_size=50, epochs=3)


def test_cpu_state_uses_the_measured_fast_paths():
    # benchmarks/README.md: fused Adam and channels_last are what makes fit beat the tutorial's loop.
    state = new_training_state(lr=0.01, seed=0, device=CPU)
    assert state.optimizer.param_groups[0]["fused"]
    assert state.model.conv2.weight.is_contiguous(memory_format=torch.channels_last)


def test_device_resolution():
    assert resolve_device("cpu") == CPU
    assert resolve_device("auto").type in ("cuda", "mps", "cpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == CPU or resolve_device("auto").type == "mps"
        with pytest.raises(ConfigError, match="device: cuda was asked for but is not available"):
            resolve_device("cuda")
    with pytest.raises(ConfigError, match="device"):
        resolve_device("tpu")


def test_bf16_autocast_learns_and_keeps_weights_and_adam_in_fp32(splits):
    state, history = _fit(splits, epochs=3, bf16=True)
    _, plain = _fit(splits, epochs=3)
    assert history[0]["train_loss"] != plain[0]["train_loss"]  # autocast ran: bf16 rounds activations
    assert history[-1]["val_accuracy"] > 0.5
    assert all(p.dtype == torch.float32 for p in state.model.parameters())
    assert all(s["exp_avg"].dtype == torch.float32 for s in state.optimizer.state.values())


@pytest.mark.slow  # compiling takes 10-30 s on CPU
def test_torch_compile_computes_the_same_step_and_keeps_the_state_dict_plain(splits):
    compiled_state, compiled = _fit(splits, epochs=1, torch_compile=True)
    _, plain = _fit(splits, epochs=1)
    assert compiled[0]["train_loss"] == pytest.approx(plain[0]["train_loss"], rel=1e-3)
    assert not any(key.startswith("_orig_mod") for key in compiled_state.model.state_dict())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("options", [{}, {"bf16": True, "torch_compile": True}])
def test_fit_on_cuda(splits, options):
    state = new_training_state(lr=0.01, seed=0, device=torch.device("cuda"))
    history = fit(state, *splits, batch_size=50, epochs=2, **options)
    assert history[-1]["val_accuracy"] > 0.3
    assert torch.backends.cudnn.benchmark
