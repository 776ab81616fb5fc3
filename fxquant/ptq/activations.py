"""What the calibrate-time PTQ passes (SmoothQuant, outlier channels) share: the sites they find in each traced
part, and the float activations they decide on (what chosen modules read or return over the calibration
batches, with every quantizer off)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from functools import partial
from typing import TypeVar

import torch
from torch import fx, nn

from fxquant.ptq.layers import float_mode

Forward = Callable[[int, tuple], object]  # run(batch index, batch): one calibration forward, errors named
T = TypeVar("T")
MAX_ROWS = 8192  # activation rows (tokens) kept per tap for the passes' searches


class Sharing:
    """Who uses each parameter of a model: the modules that hold it (a tied LM head and its embedding both do)
    and the traced parts that read it directly (``get_attr``); and every call of each module in each traced part.
    A pass may change a weight in place only where every user of it is a call the pass accounts for."""

    def __init__(self, model: nn.Module) -> None:
        self.holders: dict[int, list[tuple[str, nn.Module | None]]] = {}
        for name, module in model.named_modules(remove_duplicate=False):
            for p in module.parameters(recurse=False):
                self.holders.setdefault(id(p), []).append((name, module))
        self.calls: dict[int, list[fx.Node]] = {}  # id(module) -> its call nodes, over every traced part
        for gm in [m for m in model.modules() if isinstance(m, fx.GraphModule)]:
            modules = dict(gm.named_modules())
            for node in gm.graph.nodes:
                if node.op == "get_attr" and isinstance(_attr(gm, node.target), nn.Parameter):
                    self.holders.setdefault(id(_attr(gm, node.target)), []).append((f"`{node.name}`", None))
                elif node.op == "call_module" and node.target in modules:
                    self.calls.setdefault(id(modules[node.target]), []).append(node)

    def outside(self, params: list[torch.Tensor], owners: list[nn.Module]) -> str | None:
        """The name of a user of ``params`` other than the modules ``owners``, or None."""
        mine = {id(m) for m in owners}
        for p in params:
            for name, module in self.holders.get(id(p), []):
                if module is None or id(module) not in mine:
                    return name
        return None

    def called_elsewhere(self, module: nn.Module, nodes: list[fx.Node]) -> bool:
        """Whether ``module`` has a call other than ``nodes`` (in any traced part)."""
        return any(n not in nodes for n in self.calls.get(id(module), []))


def _attr(gm: fx.GraphModule, target: str) -> object:
    obj: object = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj


def sites_by_part(model: nn.Module, find: Callable[[fx.GraphModule, Sharing], tuple[list[T], list[str]]]
                  ) -> tuple[dict[fx.GraphModule, list[T]], list[str]]:
    """``find(gm, sharing) -> (sites, notes)`` over every traced part of ``model``: the parts with sites, and all
    notes."""
    sites: dict[fx.GraphModule, list[T]] = {}
    notes: list[str] = []
    sharing = Sharing(model)
    for gm in [m for m in model.modules() if isinstance(m, fx.GraphModule)]:
        found, skipped = find(gm, sharing)
        notes += skipped
        if found:
            sites[gm] = found
    return sites, notes


def plain_forward(model: nn.Module) -> Forward:
    """``model(*batch)``, for PTQ passes called outside calibrate()."""
    return lambda _index, batch: model(*batch)


@torch.no_grad()
def float_rows(model: nn.Module, taps: Mapping[int, tuple[nn.Module, str]], batches: Iterable,
               run: Forward | None = None) -> dict[int, torch.Tensor]:
    """Per tap ``key -> (module, "input" | "output")``: the rows (last dimension = channels, at most
    ``MAX_ROWS``, float32) of what that module reads or returns over ``batches``, every quantizer disabled.
    A tap that never ran gets one row of zeros."""
    with tapped_rows(taps) as rows, float_mode(model):
        for i, batch in enumerate(batches):
            (run or plain_forward(model))(i, batch)
    return stacked_rows(rows, taps)


@contextlib.contextmanager
def tapped_rows(taps: Mapping[int, tuple[nn.Module, str]]) -> Iterator[dict[int, list[torch.Tensor]]]:
    """Hooks that keep, per tap ``key -> (module, "input" | "output")``, the first ``MAX_ROWS`` rows of what the
    module reads or returns in the forwards run inside (float32, one tensor per forward); removed on exit."""
    rows: dict[int, list[torch.Tensor]] = {}
    handles = [module.register_forward_pre_hook(partial(_keep_input, rows, key)) if where == "input"
               else module.register_forward_hook(partial(_keep_output, rows, key))
               for key, (module, where) in taps.items()]
    try:
        yield rows
    finally:
        for h in handles:
            h.remove()


def stacked_rows(rows: Mapping[int, list[torch.Tensor]], keys: Iterable[int]) -> dict[int, torch.Tensor]:
    """``tapped_rows``' rows as one [rows, channels] tensor per key (one row of zeros for a tap that never ran)."""
    return {key: torch.cat(rows.get(key) or [torch.zeros(1, 1)])[:MAX_ROWS] for key in keys}


def _keep(rows: dict[int, list], key: int, x: torch.Tensor) -> None:
    kept = rows.setdefault(key, [])
    room = MAX_ROWS - sum(len(r) for r in kept)
    if room > 0:  # rows past MAX_ROWS would be dropped: not copied at all
        kept.append(x.detach().reshape(-1, x.shape[-1])[:room].float())


def _keep_input(rows: dict[int, list], key: int, _module: nn.Module, args: tuple) -> None:
    _keep(rows, key, args[0])


def _keep_output(rows: dict[int, list], key: int, _module: nn.Module, _args: tuple, out: torch.Tensor) -> None:
    _keep(rows, key, out)
