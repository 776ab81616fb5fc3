"""torchvision models with random weights and randomized BatchNorm statistics (no weights download offline).

Randomized running statistics and affine parameters make BatchNorm folding matter, as it does for trained
models, so these exercise the whole pipeline honestly.
"""

from __future__ import annotations

import torch
import torchvision


def random_torchvision(name: str, seed: int = 0) -> torch.nn.Module:
    """``torchvision.models.<name>()`` with BN running_mean ~ U(-0.5, 0.5), running_var ~ U(0.5, 2),
    weight ~ U(0.5, 1.5), bias ~ U(-0.3, 0.3); in eval mode."""
    torch.manual_seed(seed)
    model = getattr(torchvision.models, name)()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    return model.eval()
