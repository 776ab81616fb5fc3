"""Factories for the command line, on real data that ships offline (scikit-learn's digits).

    fxquant report examples/digits_cli.py:model --calib examples/digits_cli.py:calibration_images \
        --backend onnxruntime --out digits_sensitivity.html --png digits_sensitivity.png
    fxquant quantize examples/digits_cli.py:model --calib examples/digits_cli.py:calibration_images \
        --backend onnxruntime --out digits_onnxruntime.onnx

``model`` trains the digits CNN (a few seconds on CPU, seed 0); ``calibration_images`` returns training
images, shape (N, 1, 8, 8). Any ``file.py:function`` returning an nn.Module (model) or a tensor / list of
batches (data) works the same way.
"""

from __future__ import annotations

import torch

from fxquant.cli.demo_model import load_digits_split, train_digits


def model() -> torch.nn.Module:
    """DigitsNet trained on the digits training split (seed 0)."""
    torch.manual_seed(0)
    return train_digits(seed=0, data=load_digits_split(seed=0))


def calibration_images() -> torch.Tensor:
    """The training images, (1347, 1, 8, 8) in [-1, 1]."""
    return load_digits_split(seed=0)[0]
