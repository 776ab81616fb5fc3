"""Tiny models shared by several test files."""

from __future__ import annotations

import torch
from torch import nn


class ConvFC(nn.Module):
    """conv -> relu -> flatten -> linear on (N, 3, 8, 8) inputs; 5 outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))
