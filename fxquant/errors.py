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


class ExampleTypeError(ExampleInputError, TypeError):
    """The example inputs are not a tensor or a tuple of tensors."""


class CalibrationDataError(CalibrationError, ValueError):
    """A calibration batch cannot be used (empty, wrong type, shape or dtype); the message names the batch."""


class CalibrationTypeError(CalibrationDataError, TypeError):
    """calibrate() got something that is not an iterable of batches (None, a single tensor, a dict)."""


class ModelError(FxQuantError, TypeError):
    """The model cannot be prepared as given (already prepared/converted, pruning hooks, ...)."""


class ConfigError(FxQuantError, ValueError):
    """A bad argument or setting: a QuantSpec/QuantConfig/Rule field out of range, a glob that matches nothing,
    an unknown name (backend, calib method, argument)."""


class ConfigTypeError(ConfigError, TypeError):
    """An argument or setting of the wrong type (a QuantConfig field, a Rule part, an option)."""


class ExportError(ConversionError, ValueError):
    """export_onnx() got arguments it cannot honour (example inputs, dtype, path, opset)."""


class QuantRangeError(FxQuantError, ValueError):
    """A quantization range or scale that cannot be used (a negative amax, a scale beyond float16)."""


class NegativeInputError(FxQuantError, TypeError):
    """Negative values reached an unsigned quantizer (a TypeError, as in pytorch_quantization)."""


class InputShapeError(FxQuantError, ValueError):
    """A captured model was called with input sizes outside what its capture holds (the message names the guard)."""
