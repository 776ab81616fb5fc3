"""fxquant: torch.fx graph-mode quantization to fake-quant GraphModules and QDQ ONNX for TensorRT and ORT."""

from fxquant.analysis.mixed_precision import MixedPrecisionResult, mixed_precision
from fxquant.analysis.sensitivity import LayerSensitivity, SensitivityReport, sensitivity
from fxquant.analysis.tune import TuneResult, tune
from fxquant.api import adaround, calibrate, convert, correct_bias, load_calib_amax, prepare, quantize, report_of
from fxquant.backends import BACKENDS, Backend
from fxquant.encodings import EncodingsError, encodings_of, load_encodings, save_encodings
from fxquant.errors import (
    CalibrationDataError,
    CalibrationError,
    CalibrationTypeError,
    ConfigError,
    ConfigTypeError,
    ConversionError,
    ExampleInputError,
    ExampleTypeError,
    ExportError,
    FxQuantError,
    ModelError,
    NegativeInputError,
    PassError,
    QuantRangeError,
    TraceError,
)
from fxquant.lower.onnx_export import ExportResult, export_onnx
from fxquant.metrics import sqnr
from fxquant.qat import QATError, check_optimizer, prepare_qat
from fxquant.quantizer import TensorQuantizer, fake_tensor_quant, tensor_quant
from fxquant.rules import Pattern, Rule, RuleContext, Targets
from fxquant.spec import AdaRoundOptions, Override, QuantConfig, QuantSpec
from fxquant.version import __version__

__all__ = [
    "BACKENDS",
    "AdaRoundOptions",
    "Backend",
    "CalibrationDataError",
    "CalibrationError",
    "CalibrationTypeError",
    "ConfigError",
    "ConfigTypeError",
    "ConversionError",
    "EncodingsError",
    "ExampleInputError",
    "ExampleTypeError",
    "ExportError",
    "ExportResult",
    "FxQuantError",
    "LayerSensitivity",
    "MixedPrecisionResult",
    "ModelError",
    "NegativeInputError",
    "Override",
    "PassError",
    "Pattern",
    "QATError",
    "QuantConfig",
    "QuantRangeError",
    "QuantSpec",
    "Rule",
    "RuleContext",
    "SensitivityReport",
    "Targets",
    "TensorQuantizer",
    "TraceError",
    "TuneResult",
    "__version__",
    "adaround",
    "calibrate",
    "check_optimizer",
    "convert",
    "correct_bias",
    "encodings_of",
    "export_onnx",
    "fake_tensor_quant",
    "load_calib_amax",
    "load_encodings",
    "mixed_precision",
    "prepare",
    "prepare_qat",
    "quantize",
    "report_of",
    "save_encodings",
    "sensitivity",
    "sqnr",
    "tensor_quant",
    "tune",
]
