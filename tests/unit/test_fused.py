"""K Networks as one: the fused forward computes each member's own logits, rows round-trip to Networks."""
import torch

from cnnexp.fused import flatten, fused_forward, parameter_count, row_views, unflatten
from cnnexp.model import Network, count_parameters


def _members(k):
    torch.manual_seed(0)
    networks = [Network() for _ in range(k)]
    flat = torch.stack([flatten(list(n.parameters())) for n in networks])
    return networks, flat


def test_a_shared_input_gives_each_member_its_own_networks_logits():
    networks, flat = _members(3)
    x = torch.rand(5, 1, 28, 28)
    logits = fused_forward(row_views(flat), x)
    for j, network in enumerate(networks):
        torch.testing.assert_close(logits[j], network(x), atol=1e-5, rtol=1e-5)


def test_one_input_per_member_is_that_members_channel():
    networks, flat = _members(3)
    x = torch.rand(5, 3, 28, 28)
    logits = fused_forward(row_views(flat), x)
    for j, network in enumerate(networks):
        torch.testing.assert_close(logits[j], network(x[:, j : j + 1]), atol=1e-5, rtol=1e-5)


def test_a_row_is_a_networks_parameters_and_back():
    networks, flat = _members(2)
    assert flat.shape == (2, parameter_count()) and parameter_count() == count_parameters(networks[0])
    restored = Network()
    restored.load_state_dict(unflatten(flat[1]))
    for name, tensor in networks[1].state_dict().items():
        assert torch.equal(restored.state_dict()[name], tensor)
