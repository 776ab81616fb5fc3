"""Quantization-aware training: prepare_qat, the QAT quantizer (STE, LSQ, EMA, freezing) and checks."""

from fxquant.qat.optim import check_optimizer, param_groups
from fxquant.qat.prepare import QATError, QATOptions, prepare_qat
from fxquant.qat.quantizer import QATQuantizer, lsq_fake_quant

__all__ = ["QATError", "QATOptions", "QATQuantizer", "check_optimizer", "lsq_fake_quant", "param_groups", "prepare_qat"]
