"""The torchvision zoo of issue 5: every classification family, with random weights and randomized BatchNorm
statistics (``fxquant.cli.torchvision_models.random_torchvision``)."""

from __future__ import annotations

import torch

from fxquant.cli.torchvision_models import random_torchvision

# The zoo of issue 5: every torchvision classification family at 112x112 (4x4 final feature maps: at 64x64 the
# 2x2 maps leave the global pool too little to average, and float rounding flips at the quantizers dominate the
# ORT vs fake-quant comparison). MaxViT's 7x7 partitions need 224; ViT is built for 64x64 (``image_size``).
ZOO: dict[str, dict] = {
    "resnet18": {}, "resnet50": {}, "resnext50_32x4d": {}, "wide_resnet50_2": {},
    "mobilenet_v2": {}, "mobilenet_v3_large": {}, "mobilenet_v3_small": {},
    "efficientnet_b0": {}, "efficientnet_v2_s": {}, "regnet_y_400mf": {}, "shufflenet_v2_x1_0": {},
    "squeezenet1_0": {}, "densenet121": {}, "googlenet": {}, "inception_v3": {},
    "mnasnet0_5": {}, "convnext_tiny": {}, "vit_b_16": {"size": 64, "kwargs": {"image_size": 64}},
    "swin_t": {}, "maxvit_t": {"size": 224}, "vgg11": {}, "alexnet": {},
}


def zoo_model(name: str, seed: int = 0) -> tuple[torch.nn.Module, int]:
    """(random_torchvision model, input side length) for a ZOO entry."""
    if name not in ZOO:
        raise ValueError(f"{name!r} is not in the zoo; zoo models: {sorted(ZOO)}")
    entry = ZOO[name]
    return random_torchvision(name, seed, **entry.get("kwargs", {})), entry.get("size", 112)
