"""fxquant's exceptions: every one derives from FxQuantError; each message says what is wrong and what to do."""


class FxQuantError(RuntimeError):
    """Base class of fxquant's runtime errors."""


class TraceError(FxQuantError):
    """torch.fx could not trace the model; the message names the module and the line."""


class PassError(FxQuantError):
    """A graph pass failed; the message names the pass."""


class CalibrationError(FxQuantError):
    """Calibration could not run or produced no usable range."""


class ConversionError(FxQuantError):
    """convert() or export_onnx() got a model it cannot lower."""


class ExampleInputError(FxQuantError, ValueError):
    """The example inputs do not fit the model."""


class QuantRangeError(FxQuantError, ValueError):
    """A quantization range or scale that cannot be used (a negative amax, a scale beyond float16)."""


class NegativeInputError(FxQuantError, TypeError):
    """Negative values reached an unsigned quantizer (a TypeError, as in pytorch_quantization)."""
