"""Small models on real data that ships offline (scikit-learn's handwritten digits)."""

from fxquant.models.digits import DigitsNet, accuracy, load_digits_split, train_digits

__all__ = ["DigitsNet", "accuracy", "load_digits_split", "train_digits"]
