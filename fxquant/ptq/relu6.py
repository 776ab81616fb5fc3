"""Equalizing through ReLU6 (DFQ's recipe for MobileNetV2): treat ReLU6 / Hardtanh(0, m) as ReLU.

Equalization through ReLU is exact, so the equalized model computes the original model with those clips replaced
by ReLU: the change in float output can be measured before anything is rescaled, by running the graph with the
clips as ReLU. ``QuantConfig.equalize_relu6``: True always, False never, None (default) when weights are
per-tensor and the change keeps the output SQNR on the example inputs at or above ``MIN_SQNR_DB``.

Measured (benchmarks/relu6_equalize.py) on the trained ReLU6 MobileNet-digits: the float change is 36.4 dB on
the example inputs (29.4 dB on the test split, accuracy unchanged); per-tensor 8/6/4-bit weights gain
3.1/2.2/3.5 dB output SQNR; the ORT preset's per-channel weights lose 0.9 dB. On pretrained EfficientNet-Lite0
with a random example input the change is -1.9 dB: its ReLU6 clips matter, and the default leaves them.
"""

from __future__ import annotations

import torch
from torch import fx

from fxquant.backends.base import Backend
from fxquant.capture.trace import normalize_inputs
from fxquant.metrics import sqnr
from fxquant.spec import QuantConfig

MIN_SQNR_DB = 30.0


def through_relu6(config: QuantConfig, backend: Backend) -> bool | None:
    """``config.equalize_relu6``; by default None (decide by measurement) for per-tensor weights, else False."""
    if config.equalize_relu6 is not None:
        return config.equalize_relu6
    return None if (config.weight or backend.weight).axis is None else False


class _AsReLU(fx.Interpreter):
    """Runs the graph with the given clipping nodes computed as ReLU."""

    def __init__(self, gm: fx.GraphModule, nodes: list[fx.Node]) -> None:
        super().__init__(gm)
        self.nodes = set(nodes)

    def run_node(self, n: fx.Node) -> object:
        if n in self.nodes:
            return torch.relu(self.env[n.all_input_nodes[0]])
        return super().run_node(n)


@torch.no_grad()
def change_db(gm: fx.GraphModule, nodes: list[fx.Node], example_inputs: object) -> float | None:
    """SQNR (dB) of the model output with ``nodes`` as ReLU against the output as is; None without inputs."""
    if example_inputs is None:
        return None
    inputs = normalize_inputs(example_inputs)
    reference, changed = _flat(gm(*inputs)), _flat(_AsReLU(gm, nodes).run(*inputs))
    return sqnr(torch.cat([t.reshape(-1) for t in reference]), torch.cat([t.reshape(-1) for t in changed]))


def unclip(gm: fx.GraphModule, nodes: list[fx.Node]) -> None:
    """Replace each clipping activation by ``torch.relu`` of its input."""
    for node in nodes:
        with gm.graph.inserting_before(node):
            relu = gm.graph.call_function(torch.relu, (node.all_input_nodes[0],))
        relu.meta = dict(node.meta)
        node.replace_all_uses_with(relu)
        gm.graph.erase_node(node)
        if node.op == "call_module" and not any(n.target == node.target for n in gm.graph.nodes):
            gm.delete_submodule(node.target)
    gm.recompile()


def _flat(value: object) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value.detach().float()]
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (tuple, list)) else ()
    return [t for v in items for t in _flat(v)]
