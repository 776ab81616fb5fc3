"""Conv/Linear layers called from eager (untraced) code, quantized by module swap.

Where each quantizer goes is still the backend's decision: the layer is put alone in a one-op graph and the
backend's rules (and the user's) annotate it; the layer then becomes its quantized twin (same parameters,
same state-dict keys) with ``input_quantizer`` / ``output_quantizer`` where the rules asked for them.
"""

from __future__ import annotations

from torch import Tensor, fx, nn

from fxquant.backends.base import Backend
from fxquant.capture.trace import propagate_shapes
from fxquant.ops.kinds import module_kind
from fxquant.ops.quant_modules import (
    QuantConv1d,
    QuantConv2d,
    QuantConv3d,
    QuantConvTranspose1d,
    QuantConvTranspose2d,
    QuantConvTranspose3d,
    QuantLinear,
    with_weight_quantizer,
)
from fxquant.passes.annotate import annotate
from fxquant.quantizer import TensorQuantizer
from fxquant.report import OpEntry
from fxquant.rules import GraphView
from fxquant.spec import QuantConfig


class _EagerIO:
    """Quantizes the layer's input and/or output around the quantized twin's forward."""

    def forward(self, input: Tensor, *args: object, **kwargs: object) -> Tensor:
        quantize_in = self._modules.get("input_quantizer")
        quantize_out = self._modules.get("output_quantizer")
        out = super().forward(quantize_in(input) if quantize_in is not None else input, *args, **kwargs)
        return quantize_out(out) if quantize_out is not None else out


class EagerQuantConv1d(_EagerIO, QuantConv1d):
    pass


class EagerQuantConv2d(_EagerIO, QuantConv2d):
    pass


class EagerQuantConv3d(_EagerIO, QuantConv3d):
    pass


class EagerQuantConvTranspose1d(_EagerIO, QuantConvTranspose1d):
    pass


class EagerQuantConvTranspose2d(_EagerIO, QuantConvTranspose2d):
    pass


class EagerQuantConvTranspose3d(_EagerIO, QuantConvTranspose3d):
    pass


class EagerQuantLinear(_EagerIO, QuantLinear):
    pass


EAGER_CLASSES: dict[type, type] = {
    QuantConv1d: EagerQuantConv1d, QuantConv2d: EagerQuantConv2d, QuantConv3d: EagerQuantConv3d,
    QuantConvTranspose1d: EagerQuantConvTranspose1d, QuantConvTranspose2d: EagerQuantConvTranspose2d,
    QuantConvTranspose3d: EagerQuantConvTranspose3d, QuantLinear: EagerQuantLinear,
}


def _one_op_graph(path: str, module: nn.Module, inputs: tuple) -> tuple[fx.GraphModule, fx.Node]:
    graph = fx.Graph()
    args = tuple(graph.placeholder(f"input_{i}") for i in range(len(inputs)))
    node = graph.call_module(path, args)
    graph.output(node)
    gm = fx.GraphModule({path: module}, graph)
    propagate_shapes(gm, inputs)
    return gm, node


def swap_layer(root: nn.Module, path: str, inputs: tuple, backend: Backend, config: QuantConfig
               ) -> tuple[bool, OpEntry]:
    """Quantizes the layer at ``path`` of ``root`` as the backend's rules place it (by module swap); returns
    whether it did, and the layer's report entry (the rule, or the reason it stayed float)."""
    module = root.get_submodule(path)
    gm, node = _one_op_graph(path, module, inputs)
    ann = annotate(GraphView(gm), backend, config)
    kind = module_kind(module)
    if node not in ann.quantized:
        return False, OpEntry(path, kind, ann.floats.get(node, "no rule quantizes it"))
    rule = ann.quantized[node]
    if node not in ann.weights:
        return False, OpEntry(path, kind, f"rule `{rule}` leaves its weight float; eager layers are quantized with "
                                          "their weight or not at all")
    spec, _ = ann.weights[node]
    twin = with_weight_quantizer(module, TensorQuantizer(spec, constant=True).train(module.training))
    twin.__class__ = EAGER_CLASSES[type(twin)]
    for request in ann.requests:
        if request.value is node:
            twin.output_quantizer = TensorQuantizer(request.spec).train(module.training)
        elif request.user is node and request.value.op == "placeholder" and request.value.name == "input_0":
            twin.input_quantizer = TensorQuantizer(request.spec).train(module.training)
    root.set_submodule(path, twin)
    return True, OpEntry(path, kind, f"{rule} (eager code: module swap)")
