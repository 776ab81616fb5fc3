"""What ``fxquant.calibrate`` accepts as a batch, and the errors that name the batch that does not fit.

A batch is a tensor, a tuple/list of tensors (one per forward argument), a NumPy array (converted, dtype kept)
or a dict whose keys are the forward's argument names. ``inputs=`` selects the model's inputs from richer
batches: an index (``inputs=0`` for the ``(x, y)`` pairs of ``DataLoader(TensorDataset(x, y))``), a dict key,
a tuple of those, or a function ``batch -> inputs``. A batch with more items than the forward takes is never
cut down silently: it raises and names ``inputs=``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from fxquant.errors import CalibrationDataError, CalibrationTypeError, FxQuantError, InputShapeError

Selector = int | str | Sequence[int | str] | Callable[[Any], Any] | None


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"{str(x.dtype).replace('torch.', '')}{list(x.shape)}"
    return type(x).__name__


def describe(batch: tuple) -> str:
    """``float32[2, 3, 8, 8], int64[2]``: what a batch holds."""
    return ", ".join(_describe(x) for x in batch)


def forward_arity(model: nn.Module) -> tuple[list[str], int, int | None]:
    """The forward's positional argument names, how many are required, and the most it takes (None: *args)."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return [], 0, None
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = sum(1 for p in positional if p.default is p.empty)
    varargs = any(p.kind is p.VAR_POSITIONAL for p in params)
    return [p.name for p in positional], required, None if varargs else len(positional)


def expected_inputs(model: nn.Module) -> list[torch.Tensor | None]:
    """Shape/dtype metadata of the example inputs ``prepare`` saw (graph placeholders), where recorded."""
    graph = getattr(model, "graph", None)
    if not isinstance(graph, fx.Graph):
        return []
    return [n.meta.get("tensor_meta") for n in graph.nodes if n.op == "placeholder"]


class ModelBatches:
    """Iterate the model inputs of each batch of ``batches`` (tuples of tensors), checking each as it comes."""

    def __init__(self, batches: Iterable, model: nn.Module, inputs: Selector = None) -> None:
        if batches is None:
            raise CalibrationTypeError("calibrate() got batches=None; pass an iterable of batches, e.g. a "
                                       "DataLoader or a list of tensors")
        if isinstance(batches, torch.Tensor):
            raise CalibrationTypeError("batches must be an iterable of batches (e.g. a DataLoader or a list of "
                                       "tensors), not a single tensor; wrap it: [tensor]")
        if isinstance(batches, (str, bytes, Mapping)) or not isinstance(batches, Iterable):
            raise CalibrationTypeError(f"batches must be an iterable of batches (a DataLoader, a list of tensors), "
                                       f"got {type(batches).__name__}")
        if not (inputs is None or callable(inputs) or isinstance(inputs, (int, str))
                or (isinstance(inputs, Sequence) and all(isinstance(k, (int, str)) for k in inputs))):
            raise CalibrationDataError(f"inputs= must be an index, a dict key, a tuple of those or a function "
                                       f"batch -> model inputs, got {type(inputs).__name__}")
        self.batches, self.selector = batches, inputs
        self.names, self.required, self.most = forward_arity(model)
        self.expected = expected_inputs(model)
        self.any_nonzero = False
        self.any_float = False

    def __len__(self) -> int:
        return len(self.batches)  # tqdm asks; a plain iterator has no len and tqdm copes with the TypeError

    def __iter__(self) -> Iterator[tuple]:
        for index, batch in enumerate(self.batches):
            inputs = self.select(batch, index)
            self.check(inputs, index)
            yield inputs

    # ---- selecting the model inputs -----------------------------------------------------------------
    def select(self, batch: object, index: int) -> tuple:
        """The model inputs of one batch, as a tuple of tensors."""
        if self.selector is not None:
            batch = self._apply_selector(batch, index)
        elif isinstance(batch, Mapping):
            batch = self._by_name(batch, index)
        inputs = _as_tuple(batch, index)
        if self.selector is None and self.most is not None and len(inputs) > self.most:
            raise CalibrationDataError(
                f"calibration batch {index} holds {len(inputs)} items ({describe(inputs)}) but the model's forward "
                f"takes {self.most} input(s) ({', '.join(self.names)}). A DataLoader over TensorDataset(x, y) "
                "yields (inputs, labels) pairs: select the inputs with calibrate(prepared, loader, inputs=0) (an "
                "index, a tuple of indices, or a function batch -> inputs)")
        return inputs

    def _apply_selector(self, batch: object, index: int) -> object:
        sel = self.selector
        if callable(sel):
            try:
                return sel(batch)
            except Exception as exc:
                raise CalibrationDataError(f"the inputs= function failed on calibration batch {index} "
                                           f"({type(batch).__name__}): {type(exc).__name__}: {exc}") from exc
        keys = (sel,) if isinstance(sel, (int, str)) else tuple(sel)
        try:
            picked = tuple(batch[k] for k in keys)
        except (KeyError, IndexError, TypeError) as exc:
            held = f"keys {list(batch)}" if isinstance(batch, Mapping) else \
                f"{len(batch)} items" if isinstance(batch, Sequence) else f"a {type(batch).__name__}"
            raise CalibrationDataError(f"inputs={sel!r} does not select from calibration batch {index} (it holds "
                                       f"{held}); pass an index or key the batches have") from exc
        return picked[0] if isinstance(sel, (int, str)) else picked

    def _by_name(self, batch: Mapping, index: int) -> tuple:
        picked = []
        for name in self.names:
            if name not in batch:
                break
            picked.append(batch[name])
        if len(picked) < max(self.required, 1):
            raise CalibrationDataError(
                f"calibration batch {index} is a dict with keys {list(batch)}, which do not name the model's "
                f"forward arguments ({', '.join(self.names)}); pass inputs='<key>' (or a tuple of keys, or a "
                "function batch -> inputs) to calibrate")
        return tuple(picked)

    # ---- checking them -----------------------------------------------------------------------------
    def check(self, inputs: tuple, index: int) -> None:
        """Raise CalibrationDataError for an empty, non-finite or wrongly typed batch."""
        if not inputs:
            raise CalibrationDataError(f"calibration batch {index} is empty (no inputs)")
        for pos, x in enumerate(inputs):
            if not isinstance(x, torch.Tensor):
                continue
            if x.dim() > 0 and x.shape[0] == 0:
                raise CalibrationDataError(f"calibration batch {index} has 0 samples ({describe(inputs)}); drop "
                                           "empty batches from the calibration data")
            if x.is_floating_point():
                self.any_float = True
                if not torch.isfinite(x).all():
                    raise CalibrationDataError(f"calibration batch {index} contains NaN or Inf values; clean the "
                                               "data (every batch is checked before it reaches the quantizers)")
                self.any_nonzero = self.any_nonzero or bool(x.any())
            meta = self.expected[pos] if pos < len(self.expected) else None
            if meta is not None and hasattr(meta, "dtype") and meta.dtype != x.dtype \
                    and (meta.dtype.is_floating_point or x.is_floating_point()):  # int32 ids for int64 are fine
                raise CalibrationDataError(
                    f"calibration batch {index} input {pos} is {_describe(x)} but the model was prepared with a "
                    f"{str(meta.dtype).replace('torch.', '')}{list(meta.shape)} example; give the batches the "
                    f"example's dtype (e.g. batch.to({meta.dtype}))")

    def check_all_zero(self) -> None:
        """Raise when every floating-point input of every batch was zero (ranges of 0 quantize all to 0)."""
        if self.any_float and not self.any_nonzero:
            raise CalibrationDataError("every calibration batch is all zeros: the ranges calibrated from it are 0 "
                                       "and quantize every activation to 0; calibrate on real data")


def run_batch(model: nn.Module, inputs: tuple, index: int, expected: list) -> None:
    """``model(*inputs)``; a failure becomes a CalibrationDataError naming the batch and what it held."""
    try:
        model(*inputs)
    except InputShapeError as exc:  # outside the sizes the capture holds: name the batch
        raise CalibrationDataError(f"calibration batch {index} ({describe(inputs)}): {exc}") from exc
    except FxQuantError:
        raise
    except Exception as exc:
        example = ", ".join(f"{str(m.dtype).replace('torch.', '')}{list(m.shape)}" for m in expected
                            if hasattr(m, "shape"))
        hint = f" (prepare's example was {example})" if example else ""
        first = (str(exc).strip().splitlines() or [""])[0]
        raise CalibrationDataError(f"the model failed on calibration batch {index} ({describe(inputs)}){hint}: "
                                   f"{type(exc).__name__}: {first}. Give every batch the shape and dtype the "
                                   "model's forward expects") from exc


def _as_tuple(batch: object, index: int) -> tuple:
    if isinstance(batch, np.ndarray):
        return (_from_numpy(batch, index),)
    if isinstance(batch, torch.Tensor):
        return (batch,)
    if isinstance(batch, (tuple, list)):
        return tuple(_from_numpy(x, index) if isinstance(x, np.ndarray) else x for x in batch)
    if isinstance(batch, Mapping):
        raise CalibrationDataError(f"calibration batch {index} is a dict (keys {list(batch)}) after inputs=; "
                                   "select tensors from it, e.g. inputs='<key>'")
    raise CalibrationDataError(f"calibration batch {index} is a {type(batch).__name__}; a batch must be a tensor, "
                               "a tuple of tensors (one per forward argument), a NumPy array or a dict keyed by "
                               "the forward's argument names (or pass inputs= to select them)")


def _from_numpy(array: np.ndarray, index: int) -> torch.Tensor:
    if array.dtype == object:
        raise CalibrationDataError(f"calibration batch {index} is a NumPy array of Python objects; give numbers")
    return torch.from_numpy(np.ascontiguousarray(array))


def clear_ranges(quantizers: Iterable[nn.Module], state: Any) -> None:
    """Forget the calibrated ranges after a failed calibration (fixed ``amax`` ranges stay), so that
    ``convert`` asks for a calibration instead of silently using the ranges of an earlier run."""
    for q in quantizers:
        if q.spec.amax is None:
            q._min = q._max = None
    state.stage = "prepared"
