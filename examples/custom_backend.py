"""A custom backend, two ways, each through quantize -> export_onnx -> ONNX Runtime.

1. ``dataclasses.replace`` on a built-in backend: TensorRT's placement under another name, with 6-bit
   activations.
2. From scratch: a ``Backend`` with its own specs and rules, one of them a handler written in code: conv -> SiLU
   units get one quantizer on the conv's input, the conv's weight, and one on the SiLU's output, unless the conv
   output is also read elsewhere (then the handler declines, and says why in the prepare report).

Run: ``python examples/custom_backend.py``; it prints one line per backend (quantizer counts, ONNX Q/DQ counts,
agreement), which tests/rules/test_rules_api.py checks.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import onnx
import torch
from torch import nn

import fxquant
from fxquant import Backend, Pattern, QuantSpec, Rule, RuleContext, Targets
from fxquant.rules import Match


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(self.conv(x))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(Block(8), Block(8))
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.blocks(torch.relu(self.stem(x)))
        return self.head(y.mean((2, 3)))


def conv_silu(match: Match, ctx: RuleContext) -> str | None:
    """Handler: quantize a conv -> SiLU unit as one op (input, weight, SiLU output), when the conv output has no
    other reader."""
    conv, act = match["conv"], match["act"]
    if len(conv.users) != 1:
        return f"`{conv.name}` is also read outside the SiLU, so its output cannot stay inside one unit"
    for x in ctx.activation_inputs(conv):
        ctx.request_input(conv, x, "conv_silu")
    ctx.quantize_weight(conv, "conv_silu")
    ctx.request_output(act, "conv_silu")
    return None


EDGE = Backend(
    name="edge_npu",
    description="an accelerator that runs conv+SiLU, linear and add in int8 with uint8 activations",
    weight=QuantSpec(num_bits=8, axis=0, narrow_range=True),
    activation=QuantSpec(num_bits=8, symmetric=False),
    rules=(
        Rule("conv_silu", Pattern.chain(("conv", "conv"), ("act", "silu")), handler=conv_silu, priority=30),
        Rule("weighted", Pattern.chain(("op", {"conv", "linear"})), Targets(inputs="op", weight="op", output="op"),
             priority=20),
        Rule("add", Pattern.chain(("op", "add")), Targets(inputs="op", output="op"), priority=20),
    ),
    passthrough=frozenset({"relu", "mean"}),
    runtime=None,  # another runtime: export verifies the graph's meaning in ORT (basic optimizations)
    export_passes=(),  # no backend-specific ONNX pass (float biases)
)
MY_TRT = dataclasses.replace(fxquant.BACKENDS["tensorrt"], name="my_trt",
                             activation=QuantSpec(num_bits=6, calib_method="max"))


def run(backend: Backend, model: nn.Module, batches: list[torch.Tensor], out: Path) -> None:
    qmodel = fxquant.quantize(model, batches[0], batches, backend=backend, progress=False)
    report = fxquant.report_of(qmodel)
    result = fxquant.export_onnx(qmodel, batches[0], out / f"{backend.name}.onnx")
    meta = {p.key: p.value for p in onnx.load(result.path).metadata_props}
    with torch.no_grad():
        db = fxquant.sqnr(model(batches[0]), qmodel(batches[0]))
    print(f"{backend.name}: metadata backend {meta['fxquant.backend']}; {report.activation_quantizers} activation + "
          f"{report.weight_quantizers} weight quantizers; conv_silu units "
          f"{sum(e.detail == 'conv_silu' for e in report.quantized) // 2}; ONNX QuantizeLinear "
          f"{result.op_counts['QuantizeLinear']}, DequantizeLinear {result.op_counts['DequantizeLinear']}; "
          f"int8 vs fp32 {db:.1f} dB; ORT vs fake-quant {result.ort_sqnr_db:.1f} dB")


def main() -> None:
    torch.manual_seed(0)
    model = Net().eval()
    batches = [torch.randn(4, 3, 16, 16) for _ in range(4)]
    with tempfile.TemporaryDirectory() as tmp:
        for backend in (MY_TRT, EDGE):
            run(backend, model, batches, Path(tmp))


if __name__ == "__main__":
    main()
