"""Cohort training's specification: each member computes what its own `fit` computes."""
import pytest
import torch

from cnnexp.cohort import Member, fit_cohort, micro_batches, new_cohort
from cnnexp.model import Network
from cnnexp.train import NonFiniteLoss, fit, new_training_state
from helpers import CPU, tensor_split

# Different lrs and batch sizes, none dividing the 301 training images; 24 is not a power of two,
# so the micro-batch stream is cut at boundaries no other member shares.
MEMBERS = [Member(0.01, 16), Member(0.003, 32), Member(0.03, 100), Member(0.001, 24)]
METRICS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy")


@pytest.fixture(scope="module")
def data():
    return tensor_split(301, 1), tensor_split(97, 2)


@pytest.fixture(scope="module")
def separate(data):
    """Each member's own fit: its history and final weights."""
    runs = []
    for member in MEMBERS:
        state = new_training_state(member.lr, seed=0, device=CPU)
        history = fit(state, *data, batch_size=member.batch_size, epochs=2)
        runs.append((history, state.model.state_dict()))
    return runs


def assert_same_training(cohort_history, network, expected):
    history, weights = expected
    assert [m["epoch"] for m in cohort_history] == [m["epoch"] for m in history]
    for got, want in zip(cohort_history, history):
        for key in METRICS:
            assert got[key] == pytest.approx(want[key], abs=1e-4), key
    for name, tensor in network.state_dict().items():
        assert ((tensor - weights[name]).norm() / weights[name].norm()).item() < 1e-4, name


def test_a_cohort_trains_each_member_exactly_as_its_own_fit(data, separate):
    cohort = new_cohort(MEMBERS, seed=0, device=CPU)
    history = fit_cohort(cohort, *data, epochs=2)
    for i, expected in enumerate(separate):
        network = cohort.network(i)
        assert type(network) is Network  # a plain Network: logged and loaded like train's
        assert_same_training(history[i], network, expected)


def test_a_member_leaving_after_epoch_1_changes_no_other_members_numbers(data, separate):
    cohort = new_cohort(MEMBERS, seed=0, device=CPU)
    seen = []

    def drop_member_1(results):
        seen.append(sorted(results))
        return {1} if len(seen) == 1 else set()

    history = fit_cohort(cohort, *data, epochs=2, on_epoch_end=drop_member_1)
    assert seen == [[0, 1, 2, 3], [0, 2, 3]] and cohort.ids == [0, 2, 3]
    assert len(history[1]) == 1
    for i in (0, 2, 3):
        assert_same_training(history[i], cohort.network(i), separate[i])


def test_a_member_that_joins_trains_as_its_own_fit_and_changes_no_other_members_numbers(data, separate):
    cohort = new_cohort(MEMBERS[:3], seed=0, device=CPU)
    joiner = Member(0.003, 24)
    seen = []

    def refill(results):
        seen.append({i: r["epoch"] for i, r in results.items()})
        if len(seen) == 1:  # 7 and 8 start their epoch 1 beside 0 and 2 at their epoch 2: different orders
            cohort.add(7, MEMBERS[3], seed=0)
            cohort.add(8, joiner, seed=5)
            return {1}
        return {0, 2} if len(seen) == 2 else set()  # complete: their rows leave, the joiners go on

    history = fit_cohort(cohort, *data, epochs=2, on_epoch_end=refill)
    assert seen == [{0: 1, 1: 1, 2: 1}, {0: 2, 2: 2, 7: 1, 8: 1}, {7: 2, 8: 2}]
    assert cohort.ids == [7, 8] and [m["epoch"] for m in history[7]] == [1, 2]
    assert_same_training(history[7], cohort.network(7), separate[3])
    state = new_training_state(joiner.lr, seed=5, device=CPU)
    own = fit(state, *data, batch_size=joiner.batch_size, epochs=2)
    assert_same_training(history[8], cohort.network(8), (own, state.model.state_dict()))
    for i in (0, 2):  # left after completing: their histories equal their own fits'
        assert [m["epoch"] for m in history[i]] == [1, 2]
        for got, want in zip(history[i], separate[i][0]):
            assert got["val_accuracy"] == pytest.approx(want["val_accuracy"], abs=1e-4)


def test_a_member_that_completes_stays_readable_and_untrained_while_others_go_on(data, separate):
    cohort = new_cohort(MEMBERS[:2], seed=0, device=CPU)
    fit_cohort(cohort, *data, epochs=1)
    cohort.add(5, MEMBERS[2], seed=0)
    history = fit_cohort(cohort, *data, epochs=2, on_epoch_end=lambda results: ())
    assert [m["epoch"] for m in history[5]] == [1, 2] and len(history[0]) == 2
    for i, expected in ((0, separate[0]), (1, separate[1]), (5, separate[2])):
        assert_same_training(history[i], cohort.network(i), expected)


def test_a_member_id_in_use_cannot_join_again():
    cohort = new_cohort(MEMBERS[:1], seed=0, device=CPU)
    with pytest.raises(ValueError, match="already"):
        cohort.add(0, MEMBERS[1], seed=0)


def test_a_diverging_member_leaves_with_its_error_and_the_others_go_on(data, separate):
    cohort = new_cohort([MEMBERS[0], Member(1e30, 32), MEMBERS[2]], seed=0, device=CPU)
    results = []
    history = fit_cohort(cohort, *data, epochs=2, on_epoch_end=lambda r: results.append(r) or ())
    assert isinstance(results[0][1], NonFiniteLoss) and results[0][1].epoch == 1
    assert 1 not in history and cohort.ids == [0, 2]
    assert_same_training(history[0], cohort.network(0), separate[0])
    assert_same_training(history[2], cohort.network(2), separate[2])


def test_the_micro_batch_stream_completes_every_members_batches():
    stream = micro_batches(70, [16, 32, 24], CPU)
    assert [(m.start, m.stop) for m in stream] == [(0, 16), (16, 24), (24, 32), (32, 48), (48, 64), (64, 70)]
    steps = torch.zeros(3, dtype=torch.long)
    for micro in stream:
        steps[micro.stepping] += 1
    assert steps.tolist() == [5, 3, 3]  # ceil(70 / b): the last partial batch steps too
    last = stream[-1]
    assert last.inv_batch_len.tolist() == pytest.approx([1 / 6, 1 / 6, 1 / 22])
    assert micro_batches(70, [32, 32], CPU)[0].stepping is None  # equal batches: no masking


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_a_cohort_on_cuda_trains_each_member_as_its_own_fit_there(data):
    cuda = torch.device("cuda")
    cohort = new_cohort(MEMBERS, seed=0, device=cuda)
    history = fit_cohort(cohort, *data, epochs=2)
    for i, member in enumerate(MEMBERS):
        state = new_training_state(member.lr, seed=0, device=cuda)
        expected = fit(state, *data, batch_size=member.batch_size, epochs=2)
        weights = {name: t.cpu() for name, t in state.model.state_dict().items()}
        # cuDNN picks its own kernels for either shape: looser than on CPU, still one model's numbers.
        for got, want in zip(history[i], expected):
            assert got["val_accuracy"] == pytest.approx(want["val_accuracy"], abs=0.02)
        network = cohort.network(i).cpu()
        for name, tensor in network.state_dict().items():
            assert ((tensor - weights[name]).norm() / weights[name].norm()).item() < 1e-2, name
