"""Fixtures shared across test areas. Models that more than one test file uses live in ``tests.models``.

Tests run torch on one thread: their tensors are small, so a second thread costs more in handoffs than it
saves, and ONNX Runtime's own threads share the same cores."""

from __future__ import annotations

import pytest
import torch

from fxquant.cli.demo_model import load_digits_split, train_digits

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def digits():
    """(the demo's digits CNN trained at seed 0 with 2 threads, (x_train, y_train, x_test, y_test)): trained once
    per run. The thread count changes float sums, hence the weights: training runs on 2 threads (as the demo does
    on the CI machine), then the tests go on with one."""
    torch.set_num_threads(2)
    try:
        data = load_digits_split(seed=0)
        return train_digits(seed=0, data=data), data
    finally:
        torch.set_num_threads(1)
