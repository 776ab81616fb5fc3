"""Fixtures shared by the PTQ tests."""

from __future__ import annotations

import pytest
import torch

from fxquant.cli.demo_model import load_digits_split
from tests.models.mobilenet_digits import train_mobilenet_digits


@pytest.fixture(scope="module")
def mobilenet_digits():
    """A MobileNet-style CNN trained on the real digits data (one thread, seed 0), its data split
    (x_train, y_train, x_test, y_test) and eight calibration batches of 64 training images."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    data = load_digits_split(seed=0)
    model = train_mobilenet_digits(epochs=6, seed=0, data=data)
    yield model, data, [data[0][i:i + 64] for i in range(0, 512, 64)]
    torch.set_num_threads(threads)
