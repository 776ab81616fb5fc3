"""Generate docs/architecture.md: the house top-down (architecture_intro.md), then one model through every pass.

The graphs are printed by the pipeline itself (``fxquant.pipeline.prepare_graph``'s observer), so the page shows
what the code does today. Regenerate: ``python docs/make_architecture.py`` (tests/test_docs_architecture.py
checks that the committed page is current).
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import warnings
from collections import Counter
from pathlib import Path

import torch
from torch import fx, nn

import fxquant
from fxquant.backends import get_backend
from fxquant.capture.trace import trace
from fxquant.pipeline import prepare_graph
from fxquant.spec import QuantConfig

INTRO = Path(__file__).with_name("architecture_intro.md")  # the hand-written part: the house top-down


class Block(nn.Module):
    """A ResNet basic block: conv-bn-relu-conv-bn plus the identity."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = Block(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.block(self.stem(x)), 1), 1))


def _code(gm: fx.GraphModule) -> str:
    lines = [line for line in gm.code.strip().splitlines() if line.strip()]
    return "\n".join(lines)


UNCHANGED = {
    "record_bn_stats": ": each conv followed by a BatchNorm records the BatchNorm's per-channel output statistics "
                       "in its node's record, for the data-free PTQ passes that run after folding.",
    "equalize": ": cross-layer equalization rescales the weights of conv1 -> relu -> conv2 (the report below).",
    "annotate_pass": ": the backend's rules decide, as data (`Annotations`, the pass's product): which tensors get "
                     "which spec, on which edges, which share a scale, and why the rest stays float.",
}


def _randomize_bn(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.2, 4)
            m.weight.data.uniform_(0.1, 3)
    return model


def walk(backend_name: str) -> str:
    torch.manual_seed(0)
    model = _randomize_bn(TinyResNet()).eval()
    x = torch.randn(2, 3, 8, 8)
    backend = get_backend(backend_name)
    config = QuantConfig(equalize=True)
    parts = [f"## One model through every pass ({backend_name} backend)\n",
             "A residual block with BatchNorm (`docs/make_architecture.py`, `TinyResNet`), "
             "`QuantConfig(equalize=True)`. After each pass, the graph's generated forward (weight quantizers sit "
             "inside the Conv/Linear modules, so they do not show in the code):\n",
             "### capture (`capture.trace`)\n", "```python", _code(trace(copy.deepcopy(model))), "```\n"]

    last = [_code(trace(copy.deepcopy(model)))]

    def observe(name: str, gm: fx.GraphModule) -> None:
        code = _code(gm)
        if code == last[0]:
            parts.append(f"### {name}\n\nThe graph is unchanged" + UNCHANGED.get(name, ".") + "\n")
        else:
            parts.extend([f"### {name}\n", "```python", code, "```\n"])
        last[0] = code

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, report = prepare_graph(trace(copy.deepcopy(model)), (x,), backend, config, observer=observe)
        parts.extend(["### the prepare report (`fxquant.report_of(prepared)`)\n", "```", report.summary(), "```\n"])
        qmodel = fxquant.quantize(model, x, [x], backend=backend, config=config, progress=False)
        with tempfile.TemporaryDirectory() as tmp:
            result = fxquant.export_onnx(qmodel, x, Path(tmp) / "walk.onnx")
    ops = ", ".join(f"{op} {n}" for op, n in sorted(Counter(result.op_counts).items()))
    parts.extend(["### convert and export\n",
                  "`convert` freezes every TensorQuantizer into a Q/DQ op with fixed scales; `export_onnx` lowers it "
                  "to QuantizeLinear/DequantizeLinear, folds weight quantization into integer initializers"
                  + (", writes int32 biases" if "int32_bias" in backend.export_passes else "")
                  + " and verifies in ONNX Runtime "
                  f"(optimization level `{backend.verify_level}`). ONNX ops: {ops}.\n"])
    return "\n".join(parts)


def render() -> str:
    return INTRO.read_text() + "\n" + walk("tensorrt")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).with_name("architecture.md")))
    args = parser.parse_args(argv)
    Path(args.out).write_text(render())
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
