"""An epoch as data: every member's batches covered once, each weighing its own batch's mean."""
import pytest
import torch

from cnnexp.schedule import batch_weights, epoch_orders, micro_size, padded_rows, stepping


def test_micro_batches_complete_every_members_batches_the_last_partial_one_too():
    sizes, n = [16, 32, 24], 70
    micro = micro_size(sizes)
    assert micro == 8
    steps = stepping(n, sizes, micro)
    assert steps.sum(dim=0).tolist() == [5, 3, 3]  # ceil(70 / b)
    assert steps[-1].all()  # the epoch's end completes every batch
    weights = batch_weights(n, sizes, micro)
    torch.testing.assert_close(weights[-1, :, :6], torch.tensor([[1 / 6] * 6, [1 / 6] * 6, [1 / 22] * 6]))
    assert weights[-1, :, 6:].eq(0).all()  # padding weighs nothing
    # Over the micro-batches of each of its batches, a member's weights add up to 1: a mean per batch.
    for j in range(3):
        ends = steps[:, j].nonzero().flatten()
        sums = weights[:, j].sum(dim=1).cumsum(dim=0)[ends]
        assert torch.diff(sums, prepend=sums.new_zeros(1)).tolist() == pytest.approx([1.0] * len(ends))


def test_padded_rows_keep_each_members_order_and_gather_row_0_as_padding():
    orders = epoch_orders([torch.Generator().manual_seed(s) for s in (0, 1)], 10)
    assert sorted(orders[0].tolist()) == list(range(10)) and not torch.equal(orders[0], orders[1])
    rows = padded_rows(orders, 4)
    assert rows.shape == (3, 2, 4)
    assert rows.transpose(0, 1).reshape(2, -1)[:, :10].tolist() == orders.tolist()
    assert rows[-1, :, 2:].eq(0).all()


def test_a_members_generator_alone_decides_its_order():
    again = epoch_orders([torch.Generator().manual_seed(0)], 50)
    torch.manual_seed(123)  # the global generator (weight init, dropout) does not shift it
    assert torch.equal(epoch_orders([torch.Generator().manual_seed(0)], 50), again)
