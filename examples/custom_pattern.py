"""Custom placement rules for a new architecture: conv -> SiLU as one quantization unit, quantizers around a
custom attention block, composed with the onnxruntime backend's own rules by priority.

    python examples/custom_pattern.py

Prints the prepare summary with the custom rules, then, for the backend's rules alone and with the two custom
rules: the activation quantizers prepare inserted, the ops each custom rule quantized, the QuantizeLinear nodes
in the exported ONNX, the int8 model against fp32, and ONNX Runtime against the fake-quant model (dB).
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

import fxquant
from fxquant import BACKENDS, Pattern, QuantConfig, Rule, Targets
from fxquant.rules import single_user


class ConvBnSiLU(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class PixelAttention(nn.Module):
    """A custom attention block, kept whole (a leaf): its own code runs in float inside the quantizers."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        t = x.flatten(2)
        weights = torch.softmax(t.transpose(1, 2) @ t / c**0.5, dim=-1)
        return (t @ weights.transpose(1, 2)).view(b, c, h, w) + x


class TinyDetector(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = ConvBnSiLU(3, 8, 2)
        self.block1 = ConvBnSiLU(8, 16, 2)
        self.attn = PixelAttention()
        self.block2 = ConvBnSiLU(16, 16)
        self.head = nn.Conv2d(16, 6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block2(self.attn(self.block1(self.stem(x)))))


# conv -> SiLU is one unit: no quantizer between them, one on the SiLU's output. Priority 40 puts it before the
# backend's rules (30: fused pairs such as conv -> relu, 20: single ops), so it takes those convs first.
CONV_SILU = Rule("conv_silu", Pattern.chain(("conv", "conv"), ("act", "silu")),
                 Targets(inputs="conv", weight="conv", output="act"), checks=(single_user("conv"),), priority=40)
# a pattern node can name a module class: quantize what enters and what leaves the attention block
ATTENTION_IO = Rule("attention_io", Pattern.chain(("attn", PixelAttention)), Targets(inputs="attn", output="attn"),
                    priority=40)


def _randomize_bn(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


def prepare(model: nn.Module, backend: fxquant.Backend, config: QuantConfig) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 3, 32, 32, generator=g) for _ in range(4)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the float ops are listed by the report
        prepared = fxquant.prepare(model, batches[0], backend=backend, config=config)
    return fxquant.calibrate(prepared, batches, progress=False)


def run(name: str, model: nn.Module, prepared: nn.Module, out: Path) -> None:
    report = fxquant.report_of(prepared)
    by_rule = {rule: sum(1 for e in report.quantized if e.detail == rule) for rule in ("conv_silu", "attention_io")}
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    qmodel = fxquant.convert(prepared)
    with torch.no_grad():
        int8_db = fxquant.sqnr(model(x), qmodel(x))
    result = fxquant.export_onnx(qmodel, x, out / f"{name}.onnx")
    print(f"{name}: {report.activation_quantizers} activation quantizers; ops by conv_silu {by_rule['conv_silu']}, "
          f"by attention_io {by_rule['attention_io']}; ONNX QuantizeLinear {result.op_counts['QuantizeLinear']}; "
          f"int8 vs fp32 {int8_db:.1f} dB; ORT vs fake-quant {result.ort_sqnr_db:.1f} dB")


def main() -> None:
    torch.manual_seed(0)
    model = _randomize_bn(TinyDetector())
    ort = BACKENDS["onnxruntime"]
    leaf = QuantConfig(leaf_modules=("PixelAttention",))  # keep the block whole so a rule can match it
    custom = prepare(model, ort.with_rules(CONV_SILU, ATTENTION_IO), leaf)  # a backend with the rules added
    print(fxquant.report_of(custom).summary())
    with tempfile.TemporaryDirectory() as tmp:
        run("backend_rules", model, prepare(model, ort, leaf), Path(tmp))
        run("custom_rules", model, custom, Path(tmp))


if __name__ == "__main__":
    main()
