"""Backend registry: an explicit mapping, no import side effects."""

from __future__ import annotations

from fxquant.backends.base import Backend
from fxquant.backends.onnxruntime import ONNXRUNTIME
from fxquant.backends.onnxruntime_dynamic import ONNXRUNTIME_DYNAMIC
from fxquant.backends.tensorrt import TENSORRT
from fxquant.errors import ConfigError

BACKENDS: dict[str, Backend] = {b.name: b for b in (TENSORRT, ONNXRUNTIME, ONNXRUNTIME_DYNAMIC)}


def get_backend(backend: str | Backend) -> Backend:
    """Look a backend up by name (or pass a Backend through); unknown names list the valid ones."""
    if isinstance(backend, Backend):
        return backend
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; valid backends: {sorted(BACKENDS)}")
    return BACKENDS[backend]


__all__ = ["BACKENDS", "Backend", "get_backend"]
