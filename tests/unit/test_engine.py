"""The engine's contract: a member trained beside others computes what its own `fit` computes, whoever
joins or leaves, and on CUDA the captured step computes what the eager step does."""
from types import SimpleNamespace

import pytest
import torch

from cnnexp import engine as engine_module
from cnnexp.engine import Engine, Member, NonFiniteLoss
from cnnexp.model import Network
from cnnexp.train import fit, new_training_state
from helpers import CPU, tensor_split

# Two members share each batch size (one table holds both), none dividing the 301 training images, so
# every epoch ends in a padded batch; 24 is not a power of two. lrs stay small: at lr 0.03 and batch 16
# rounding alone (2e-5 after one epoch) grows into another trajectory within two.
MEMBERS = [Member(0.01, 16), Member(0.003, 32), Member(0.005, 16), Member(0.001, 24), Member(0.002, 32)]
METRICS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy")
EPOCHS = 2  # ~40 steps of batch 16: short enough that float rounding does not grow into other trajectories


@pytest.fixture(scope="module")
def data():
    return tensor_split(301, 1), tensor_split(97, 2)


def own_fit(data, member, seed=0, device=CPU, epochs=EPOCHS):
    state, history = fit(new_training_state(member.lr, seed, device), *data, batch_size=member.batch_size,
                         epochs=epochs)
    return history, {name: t.cpu() for name, t in state.network().state_dict().items()}


def join(engine, member, seed):
    """A new member, initialised and shuffled as its own fit's."""
    return engine.join(new_training_state(member.lr, seed, engine.device), member.batch_size)


def train(engine, epochs=EPOCHS, between=lambda results: None):
    histories: dict[int, list] = {}
    for results in engine.epochs():
        for slot, result in results.items():
            histories.setdefault(slot, []).append(result)
        between(results)
        for slot in [s for s, h in histories.items() if s in engine.slots and len(h) == epochs]:
            histories[slot].append(engine.leave(slot).network())  # its final weights, as it leaves
    return histories


def assert_same_training(got, expected, metrics_abs=1e-4, weights_rel=1e-4):
    *history, network = got
    want_history, want_weights = expected
    assert type(network) is Network  # a plain Network: logged and loaded like train's
    assert [m["epoch"] for m in history] == [m["epoch"] for m in want_history]
    for g, w in zip(history, want_history):
        for key in METRICS:
            assert g[key] == pytest.approx(w[key], abs=metrics_abs), key
    for name, tensor in network.state_dict().items():
        want = want_weights[name]
        assert ((tensor.cpu() - want).norm() / want.norm()).item() < weights_rel, name


def test_members_trained_together_each_compute_their_own_fit(data):
    engine = Engine(8, *data, CPU)
    slots = [join(engine, m, 0) for m in MEMBERS]
    histories = train(engine)
    for slot, member in zip(slots, MEMBERS):
        assert_same_training(histories[slot], own_fit(data, member))


def test_members_whose_orders_differ_each_compute_their_own_fit(data):
    engine = Engine(8, *data, CPU)
    slots = [join(engine, m, seed) for seed, m in enumerate(MEMBERS)]
    histories = train(engine)
    for seed, (slot, member) in enumerate(zip(slots, MEMBERS)):
        # A member whose batch spans micro-batches (gcd 8 here) sums their gradients: other rounding than
        # its own fit's, which one member's trajectory grows from 6e-6 (val_loss, epoch 1) to 2e-4 (epoch 2).
        assert_same_training(histories[slot], own_fit(data, member, seed=seed), 1e-3, 1e-2)


def test_leaving_and_joining_between_epochs_changes_no_one_elses_numbers(data):
    engine = Engine(3, *data, CPU)
    first, second, third = (join(engine, m, 0) for m in MEMBERS[:3])  # 16, 32, 16: first and third share a table
    joined = []

    def after(results):
        if first in results and results[first]["epoch"] == 1:
            engine.leave(first)  # its row is cleared and third's moves into it
            assert engine.free == 1
            joined.append(join(engine, MEMBERS[3], 7))  # at its epoch 0 while the others are at 1

    histories = train(engine, between=after)
    assert len(histories[first]) == 1
    assert_same_training(histories[second], own_fit(data, MEMBERS[1]))
    assert_same_training(histories[third], own_fit(data, MEMBERS[2]))
    assert_same_training(histories[joined[0]], own_fit(data, MEMBERS[3], seed=7))


def test_a_state_taken_out_and_joined_again_trains_on_exactly_and_is_a_copy_both_ways(data):
    """A slot's state comes out as one value that is all of it: joined into another engine it goes on as if it
    had never left. Taken out, later epochs leave it alone; joined, the caller's value stays as it was."""
    member, start = MEMBERS[0], new_training_state(MEMBERS[0].lr, 0, CPU)
    engine = Engine(2, *data, CPU)
    slot = engine.join(start, member.batch_size)
    next(engine.epochs())
    after_one = engine.state(slot)
    straight = next(engine.epochs())[slot]
    assert (start.epoch, start.steps, after_one.epoch, engine.state(slot).epoch) == (0, 0, 1, 2)
    assert torch.equal(start.generator.get_state(), torch.Generator().manual_seed(0).get_state())
    other = Engine(1, *data, CPU)
    again = other.join(after_one, member.batch_size)
    resumed = next(other.epochs())[again]
    assert {**resumed, "epoch_time_s": 0} == {**straight, "epoch_time_s": 0}
    left, kept = other.leave(again), engine.state(slot)
    assert not other.slots and left.steps == kept.steps and left.epoch == kept.epoch == 2
    for name in ("weights", "exp_avg", "exp_avg_sq"):
        assert torch.equal(getattr(left, name), getattr(kept, name)), name
    assert torch.equal(left.generator.get_state(), kept.generator.get_state())


def test_a_full_engine_refuses_another_member(data):
    engine = Engine(1, *data, CPU)
    join(engine, MEMBERS[0], 0)
    with pytest.raises(ValueError, match="all 1 slots are taken"):
        join(engine, MEMBERS[1], 0)


def test_a_diverging_member_is_reported_and_while_its_caller_keeps_it_harms_no_one(data):
    engine = Engine(3, *data, CPU)
    slots = [join(engine, m, 0) for m in (MEMBERS[0], Member(1e30, 16), MEMBERS[1])]
    first = next(engine.epochs())
    assert isinstance(first[slots[1]], NonFiniteLoss) and first[slots[1]].epoch == 1
    assert slots[1] in engine.slots  # the caller decides: here it trains on beside the others
    histories = {s: [first[s]] for s in (slots[0], slots[2])}
    second = next(engine.epochs())
    assert isinstance(second[slots[1]], NonFiniteLoss) and second[slots[1]].epoch == 2
    for slot, member in ((slots[0], MEMBERS[0]), (slots[2], MEMBERS[1])):
        assert_same_training([*histories[slot], second[slot], engine.state(slot).network()], own_fit(data, member))


def test_each_members_epoch_time_is_its_share_of_the_epoch(data, monkeypatch):
    # An epoch that takes 8 s on the engine's clock, shared by 4 members: 2 s each, as comparable with a
    # member trained alone, whose share is the whole.
    clock = iter([100.0, 108.0])
    monkeypatch.setattr(engine_module, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    engine = Engine(4, *data, CPU)
    for m in MEMBERS[:4]:
        join(engine, m, 0)
    results = next(engine.epochs())
    assert [r["epoch_time_s"] for r in results.values()] == [2.0] * 4


def test_the_captured_paths_steps_compute_what_the_eager_ones_do(data):
    """Tables per batch size, k rounded up to a power of two, step index and Adam factors as device data:
    the captured path's step, run uncaptured on the CPU, through a leave and a join."""
    members = [Member(0.01, 16), Member(0.003, 16), Member(0.005, 16), Member(0.002, 32)]
    runs = []
    for graphs in (True, False):
        engine = Engine(4, *data, CPU, graphs=graphs)
        slots = [join(engine, m, seed) for seed, m in enumerate(members)]
        first = next(engine.epochs())
        engine.leave(slots[0])  # three rows of batch 16 left: a fourth, cleared, is computed and steps by 0
        second = next(engine.epochs())
        runs.append((first, second, {s: engine.state(s).network() for s in engine.slots}))
    (first, second, networks), (want_first, want_second, want_networks) = runs
    for slot in networks:
        expected = ([want_first[slot], want_second[slot]], want_networks[slot].state_dict())
        assert_same_training([first[slot], second[slot], networks[slot]], expected, 1e-5, 1e-5)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture
def exact_cuda():
    """TF32 off for the equivalence checks: with it, cuDNN rounds a grouped and a single convolution's
    inputs to 10-bit mantissas differently, and two copies of one model part after a few dozen steps."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield torch.device("cuda")
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@needs_cuda
def test_members_on_cuda_each_compute_their_own_fit_there(data, exact_cuda):
    engine = Engine(8, *data, exact_cuda)
    slots = [join(engine, m, seed) for seed, m in enumerate(MEMBERS)]
    histories = train(engine)
    for seed, (slot, member) in enumerate(zip(slots, MEMBERS)):
        # Float rounding only (cuDNN's kernels for a grouped and a single convolution differ): metrics within
        # 1e-3, weights within 1% relative (measured on an H200 after two epochs: 2.4e-3).
        assert_same_training(histories[slot], own_fit(data, member, seed=seed, device=exact_cuda), 1e-3, 1e-2)


@needs_cuda
def test_an_epoch_of_one_padded_step_is_captured_and_replayed(data, exact_cuda):
    """A batch larger than the split: one step an epoch, captured after warm-up steps that must not read
    past the schedule (a device-side assert would poison the process)."""
    engine = Engine(2, *data, exact_cuda)
    slots = [join(engine, Member(0.01, 512), s) for s in (0, 1)]
    for _ in range(2):
        results = next(engine.epochs())
    for slot, seed in zip(slots, (0, 1)):
        history, _ = own_fit(data, Member(0.01, 512), seed=seed, device=exact_cuda)
        assert results[slot]["train_loss"] == pytest.approx(history[-1]["train_loss"], abs=1e-4)


@needs_cuda
def test_the_captured_step_computes_what_the_eager_step_does(data, exact_cuda):
    runs = []
    for graphs in (True, False):
        engine = Engine(8, *data, exact_cuda, graphs=graphs)
        slots = [join(engine, m, seed) for seed, m in enumerate(MEMBERS)]
        runs.append((slots, train(engine)))
    (slots, captured), (_, eager) = runs
    for slot in slots:
        *history, network = eager[slot]
        assert_same_training(captured[slot], (history, {n: t.cpu() for n, t in network.state_dict().items()}), 1e-5, 1e-5)
