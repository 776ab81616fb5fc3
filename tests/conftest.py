"""Fixtures shared across test areas. Models that more than one test file uses live in ``tests.models``."""

from __future__ import annotations

import pytest
import torch

from fxquant.cli.demo_model import load_digits_split, train_digits


@pytest.fixture(scope="session")
def digits():
    """(the demo's digits CNN trained at seed 0 with 2 threads, (x_train, y_train, x_test, y_test)): trained once
    per run. The thread count changes float sums, hence the weights; it stays set, as it did per module."""
    torch.set_num_threads(2)
    data = load_digits_split(seed=0)
    return train_digits(seed=0, data=data), data
