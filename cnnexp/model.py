"""The tutorial's small CNN for 28x28 grey images."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Network(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels=1, out_channels=6, kernel_size=5)
        self.conv2 = nn.Conv2d(in_channels=6, out_channels=12, kernel_size=5)
        # 28 -conv5-> 24 -pool-> 12 -conv5-> 8 -pool-> 4, so 12 channels of 4x4 reach the first linear layer.
        self.fc1 = nn.Linear(in_features=12 * 4 * 4, out_features=120)
        self.fc2 = nn.Linear(in_features=120, out_features=60)
        self.out = nn.Linear(in_features=60, out_features=num_classes)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t = F.max_pool2d(F.relu(self.conv1(t)), kernel_size=2, stride=2)
        t = F.max_pool2d(F.relu(self.conv2(t)), kernel_size=2, stride=2)
        t = F.relu(self.fc1(t.flatten(start_dim=1)))
        t = F.relu(self.fc2(t))
        return self.out(t)


def to_inputs(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 28, 28] (0-255) -> float [N, 1, 28, 28] in 0-1, as torchvision's ToTensor gives."""
    return images.unsqueeze(1).to(torch.float32) / 255.0


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
