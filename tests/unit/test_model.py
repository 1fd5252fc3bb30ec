import torch
import torch.nn.functional as F

from cnnexp.model import Network, count_parameters, to_inputs


def test_network_shape_and_parameter_count():
    model = Network()
    assert count_parameters(model) == 32_998
    assert model(torch.rand(5, 1, 28, 28)).shape == (5, 10)
    assert [type(m).__name__ for m in model.children()] == ["Conv2d", "Conv2d", "Linear", "Linear", "Linear"]


def test_to_inputs_scales_like_to_tensor():
    images = torch.zeros(1, 28, 28, dtype=torch.uint8)
    images[0, 0, 0] = 255
    x = to_inputs(images)
    assert x.shape == (1, 1, 28, 28) and x.dtype == torch.float32
    assert x.min() == 0.0 and x.max() == 1.0


def test_a_few_adam_steps_lower_the_loss_on_one_batch():
    torch.manual_seed(0)
    model = Network()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    x, y = torch.rand(32, 1, 28, 28), torch.randint(0, 10, (32,))
    first = F.cross_entropy(model(x), y).item()
    for _ in range(40):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < first * 0.5
