"""A MobileNet-V1-style depthwise-separable CNN for the digits data: the PTQ-pass test bed.

Every layer is Conv/depthwise Conv -> BatchNorm -> ReLU with no residuals, so after BN folding the whole
network is one chain of weighted layers (conv -> dw -> pw -> dw -> pw -> dw -> pw -> pool -> fc) that
cross-layer equalization can balance, as in MobileNets.
"""

from __future__ import annotations

import torch
from torch import nn

from fxquant.cli.demo_model import fit, load_digits_split


def _conv_bn_relu(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class MobileNetDigits(nn.Module):
    """stem 3x3 conv -> 3 x (depthwise 3x3 -> pointwise 1x1) -> global average pool -> linear."""

    def __init__(self, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            *_conv_bn_relu(1, w, 3),
            *_conv_bn_relu(w, w, 3, groups=w), *_conv_bn_relu(w, 2 * w, 1),
            *_conv_bn_relu(2 * w, 2 * w, 3, stride=2, groups=2 * w), *_conv_bn_relu(2 * w, 4 * w, 1),
            *_conv_bn_relu(4 * w, 4 * w, 3, groups=4 * w), *_conv_bn_relu(4 * w, 4 * w, 1),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def train_mobilenet_digits(epochs: int = 10, seed: int = 0, batch_size: int = 32, lr: float = 5e-3,
                           data: tuple[torch.Tensor, ...] | None = None) -> MobileNetDigits:
    """Train MobileNetDigits on the digits training split (a few seconds on CPU); returned in eval mode."""
    x_train, y_train, _, _ = data if data is not None else load_digits_split()
    torch.manual_seed(seed)
    return fit(MobileNetDigits(), x_train, y_train, epochs, seed, batch_size, lr)


@torch.no_grad()
def unbalance_channels(model: MobileNetDigits, spread: float = 3.0, seed: int = 0) -> MobileNetDigits:
    """A copy of ``model`` computing the same function with badly balanced channel ranges.

    Each BatchNorm's output channel c is multiplied by k_c = 10**u, u uniform in [-spread/2, spread/2]
    (gamma and beta scaled, so after the following ReLU the channel is k_c times larger), and the next layer's
    input channel c is divided by k_c. ReLU is positively homogeneous, so the function is unchanged (float
    noise aside) while, after BN folding, per-tensor weight ranges are dominated by a few channels: the
    situation Nagel et al. (2019) describe for MobileNets, made explicit. This is the inverse of
    cross-layer equalization.
    """
    out = type(model)().eval()
    out.load_state_dict(model.state_dict())
    generator = torch.Generator().manual_seed(seed)
    layers = [m for m in out.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear))]
    for prev, bn, nxt in zip(layers, layers[1:], layers[2:], strict=False):
        if not (isinstance(prev, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)):
            continue
        k = 10.0 ** ((torch.rand(bn.num_features, generator=generator) - 0.5) * spread)
        bn.weight.mul_(k)
        bn.bias.mul_(k)
        if isinstance(nxt, nn.Linear) or nxt.groups == 1:
            nxt.weight.div_(k.view(1, -1, *([1] * (nxt.weight.dim() - 2))))
        else:  # depthwise: input channel c is read by output channel c only
            nxt.weight.div_(k.view(-1, 1, 1, 1))
    return out
