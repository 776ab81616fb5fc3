"""Small models on real data that ships offline (scikit-learn's handwritten digits)."""

from fxquant.models.digits import DigitsNet, accuracy, load_digits_split, train_digits
from fxquant.models.zoo import random_torchvision

__all__ = ["DigitsNet", "accuracy", "load_digits_split", "random_torchvision", "train_digits"]
