"""The demo's model: a small residual, depthwise-separable CNN with BatchNorm, trained in seconds on
scikit-learn's digits, and its training loop.

The data (1,797 8x8 handwritten digits) ships inside scikit-learn, so everything here runs offline. scikit-learn
is the optional extra ``fxquant[demo]``: only the demo (and the tests and examples that reuse this model) import
this module.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn


def load_digits_split(seed: int = 0, test_fraction: float = 0.25) -> tuple[torch.Tensor, ...]:
    """(x_train, y_train, x_test, y_test); images (N, 1, 8, 8) scaled to [-1, 1], stratified split."""
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    y = torch.tensor(data.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(torch.arange(len(y)).numpy(), test_size=test_fraction,
                                           random_state=seed, stratify=y.numpy())
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]


class SeparableBlock(nn.Module):
    """Depthwise 3x3 -> pointwise 1x1, with a residual (identity, or a strided 1x1 conv shortcut)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.depthwise = nn.Sequential(*_conv_bn(cin, cin, 3, stride, groups=cin), nn.ReLU())
        self.pointwise = nn.Sequential(*_conv_bn(cin, cout, 1))
        self.shortcut = nn.Sequential(*_conv_bn(cin, cout, 1, stride)) if stride != 1 or cin != cout else None
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.shortcut is None else self.shortcut(x)
        return self.relu(self.pointwise(self.depthwise(x)) + identity)


class DigitsNet(nn.Module):
    """stem conv -> 3 separable residual blocks (one downsampling) -> global average pool -> linear."""

    def __init__(self, width: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(1, width, 3), nn.ReLU())
        self.block1 = SeparableBlock(width, width)
        self.block2 = SeparableBlock(width, 2 * width, stride=2)
        self.block3 = SeparableBlock(2 * width, 2 * width)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def run_epochs(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, epochs: int,
               seed: int, batch_size: int = 32, sched: torch.optim.lr_scheduler.LRScheduler | None = None) -> None:
    """Cross-entropy training in shuffled mini-batches (a generator seeded by ``seed``); leaves ``model`` in eval
    mode. ``sched`` steps after every optimizer step."""
    generator = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=generator)
        for i in range(0, len(perm), batch_size):
            idx = perm[i:i + batch_size]
            opt.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()
            if sched is not None:
                sched.step()
    model.eval()


def fit(model: nn.Module, x_train: torch.Tensor, y_train: torch.Tensor, epochs: int, seed: int, batch_size: int,
        lr: float) -> nn.Module:
    """AdamW + one-cycle schedule over ``run_epochs``; returns ``model`` (float32) in eval mode. Call
    ``torch.manual_seed(seed)`` before building ``model`` for reproducible weights.

    Trains in float64: float32 sums depend on the CPU's vector width (AVX2 and AVX-512 kernels add in other
    orders), and training amplifies those differences into different weights; in float64 they stay far below
    float32's resolution, so the same seed gives the same float32 model on any x86 CPU."""
    model.double()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(y_train) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    run_epochs(model, opt, x_train.double(), y_train, epochs, seed, batch_size, sched)
    return model.float()


def train_digits(epochs: int = 12, seed: int = 0, batch_size: int = 32, lr: float = 3e-3,
                 data: tuple[torch.Tensor, ...] | None = None) -> DigitsNet:
    """Train DigitsNet on the digits training split (a few seconds on a laptop CPU); returned in eval mode."""
    x_train, y_train, _, _ = data if data is not None else load_digits_split()
    torch.manual_seed(seed)
    return fit(DigitsNet(), x_train, y_train, epochs, seed, batch_size, lr)


@torch.no_grad()
def accuracy(predict: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor,
             batch_size: int = 256) -> float:
    """Top-1 accuracy in percent of ``predict`` (a model or any callable returning logits)."""
    correct = 0
    for i in range(0, len(y), batch_size):
        logits = torch.as_tensor(predict(x[i:i + batch_size]))
        correct += int((logits.argmax(1) == y[i:i + batch_size]).sum())
    return 100.0 * correct / len(y)
