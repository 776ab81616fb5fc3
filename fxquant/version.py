"""fxquant's version (one place; the package, ONNX metadata and encodings read it)."""

__version__ = "0.1.0"
