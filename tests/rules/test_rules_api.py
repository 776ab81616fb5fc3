"""Custom placement rules: composition with a backend's rules by priority, validation, the example."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import fxquant
from fxquant import BACKENDS, Pattern, QuantConfig, Rule, Targets

ROOT = Path(__file__).resolve().parents[2]
ORT = BACKENDS["onnxruntime"]
TRT = BACKENDS["tensorrt"]


class _ConvReLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.conv(x))


def _conv_only(priority: int, name: str = "conv_only") -> Rule:
    return Rule(name, Pattern.chain(("conv", "conv")), Targets(inputs="conv", weight="conv"), priority=priority)


def _rules_by_node(prepared) -> dict[str, str]:
    return {e.node: e.detail for e in fxquant.report_of(prepared).quantized}


@pytest.mark.parametrize(("priority", "winner"), [(25, "weighted_clamp"), (30, "conv_only"), (35, "conv_only")])
def test_priority_decides_between_user_and_backend_rules(priority, winner):
    # the backend's conv -> relu rule has priority 30: a user rule below it gets no conv; at a tie the user wins
    backend = ORT.with_rules(_conv_only(priority))
    prepared = fxquant.prepare(_ConvReLU().eval(), torch.randn(1, 3, 8, 8), backend=backend)
    assert _rules_by_node(prepared)["conv"] == winner
    quantizers = {n.target for n in prepared.graph.nodes if n.op == "call_module" and "quantizer" in n.target}
    # conv_only quantizes the conv's input and weight only; ORT's relu then stays float with its reason
    assert len(quantizers) == (2 if winner == "weighted_clamp" else 1)


def test_without_rules_then_with_rules_replaces_a_builtin_rule():
    backend = ORT.without_rules("weighted_clamp", "weighted").with_rules(_conv_only(20, name="weighted"))
    assert [r.name for r in backend.rules][:1] == ["weighted"]
    prepared = fxquant.prepare(_ConvReLU().eval(), torch.randn(1, 3, 8, 8), backend=backend)
    assert _rules_by_node(prepared) == {"conv": "weighted"}
    assert BACKENDS["onnxruntime"] is ORT and "weighted_clamp" in [r.name for r in ORT.rules]  # unchanged


class _Gate(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(x.mean((2, 3), keepdim=True))


class _WithGate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.gate = _Gate()
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(torch.erf(self.gate(self.conv(x))))


@pytest.mark.smoke
def test_patterns_match_module_classes_and_functions():
    rules = (Rule("gate_io", Pattern.chain(("g", _Gate)), Targets(inputs="g", output="g"), priority=40),
             Rule("erf_out", Pattern.chain(("f", torch.erf)), Targets(output="f"), priority=40))
    config = QuantConfig(leaf_modules=("_Gate",))
    prepared = fxquant.prepare(_WithGate().eval(), torch.randn(1, 3, 8, 8), backend=TRT.with_rules(*rules),
                               config=config)
    by_node = _rules_by_node(prepared)
    assert by_node["gate"] == "gate_io" and by_node["erf"] == "erf_out"
    quantized = {n.args[0].name for n in prepared.graph.nodes if n.op == "call_module" and "quantizer" in n.target}
    assert quantized == {"x", "conv", "gate", "erf"}  # the gate's input and output, erf's output, x for conv


def _declines_small(match, ctx):
    shape = match["g"].meta["tensor_meta"].shape
    return None if shape[-1] >= 16 else f"`{match['g'].name}` is {shape[-1]} pixels wide; too small to bother"


def test_a_declining_check_is_the_reported_reason():
    rule = Rule("gate_io", Pattern.chain(("g", _Gate)), Targets(inputs="g", output="g"), checks=(_declines_small,),
                priority=40)
    config = QuantConfig(leaf_modules=("_Gate",))
    with pytest.warns(UserWarning, match="too small to bother"):
        prepared = fxquant.prepare(_WithGate().eval(), torch.randn(1, 3, 8, 8), backend=TRT.with_rules(rule),
                                   config=config)
    floats = {e.node: e.detail for e in fxquant.report_of(prepared).float_ops}
    assert floats["gate"] == "`gate` is 6 pixels wide; too small to bother"


def test_bad_rules_say_what_is_wrong():
    with pytest.raises(ValueError, match=r"unknown op kind\(s\) 'slu' \(did you mean 'silu'\?\)"):
        ORT.with_rules(Rule("x", Pattern.chain(("a", "slu")), Targets(inputs="a")))
    with pytest.raises(ValueError, match=r"unknown op kind"):
        TRT.with_rules(Rule("x", Pattern.chain(("a", "convv")), Targets(inputs="a")))
    with pytest.raises(ValueError, match=r"already belong to the onnxruntime backend.*without_rules\('weighted'\)"):
        ORT.with_rules(_conv_only(10, name="weighted"))
    with pytest.raises(ValueError, match="two rules are named 'a'"):
        TRT.with_rules(_conv_only(1, "a"), _conv_only(2, "a"))
    with pytest.raises(ValueError, match=r"has no rule\(s\) \['nope'\]; its rules: \['weighted_input'"):
        BACKENDS["tensorrt"].without_rules("nope")
    with pytest.raises(ValueError, match=r"Targets\.weight='act' can only name a node of kinds"):
        Rule("r", Pattern.chain(("conv", "conv"), ("act", "silu")), Targets(weight="act"))
    with pytest.raises(ValueError, match=r"Targets.output='out' is not a pattern node"):
        Rule("r", Pattern.chain(("conv", "conv")), Targets(output="out"))
    with pytest.raises(TypeError, match="priority must be an int"):
        _conv_only("high")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs exactly one of quantize"):
        Rule("r", Pattern.chain(("conv", "conv")))
    with pytest.raises(ValueError, match=r"pattern edge \('a', 'c'\) names a node that is not in the pattern"):
        Pattern((("a", frozenset({"conv"})), ("b", frozenset({"relu"}))), (("a", "c"),))
    with pytest.raises(TypeError, match=r"with_rules\(\) holds a list"):
        TRT.with_rules([_conv_only(1)])
    with pytest.raises(TypeError, match="checks must be a tuple of functions"):
        Rule("r", Pattern.chain(("conv", "conv")), Targets(inputs="conv"), checks=("single_user",))


@pytest.mark.zoo  # examples/ scripts run under -m zoo (tests/test_examples.py)
def test_custom_pattern_example_runs():
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "custom_pattern.py")], capture_output=True,
                         text=True, timeout=600, check=True).stdout
    pattern = (r"(\w+): (\d+) activation quantizers; ops by conv_silu (\d+), by attention_io (\d+); "
               r"ONNX QuantizeLinear (\d+); int8 vs fp32 ([\d.]+) dB; ORT vs fake-quant ([\d.]+) dB")
    rows = {m[0]: [float(v) for v in m[1:]] for m in re.findall(pattern, out)}
    assert set(rows) == {"backend_rules", "custom_rules"}
    base, custom = rows["backend_rules"], rows["custom_rules"]
    assert custom[1:3] == [6, 1]  # 3 conv -> SiLU units (6 ops) and the attention block
    # x, the 3 SiLU outputs (one feeds the attention block), the attention output, the head output
    assert custom[0] == 6 and custom[3] == 6 and base[1:3] == [0, 0]
    assert base[0] > custom[0] and base[3] == base[0]  # one QuantizeLinear per activation quantizer
    assert custom[4] > 30.0 and base[4] > 30.0  # int8 vs fp32
    assert custom[5] > 35.0 and base[5] > 35.0  # ORT vs fake-quant
    assert "0 float" in out.splitlines()[0]


@pytest.mark.zoo  # examples/ scripts run under -m zoo (tests/test_examples.py)
def test_custom_backends_export_and_run_in_ort():
    """A backend made with dataclasses.replace and one built from scratch (with a handler rule) both go through
    quantize -> export_onnx -> ONNX Runtime; the backend object, not its name, drives export."""
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "custom_backend.py")], capture_output=True,
                         text=True, timeout=600, check=True).stdout
    pattern = (r"(\w+): metadata backend (\w+); (\d+) activation \+ (\d+) weight quantizers; conv_silu units (\d+); "
               r"ONNX QuantizeLinear (\d+), DequantizeLinear (\d+); int8 vs fp32 ([\d.]+) dB; "
               r"ORT vs fake-quant ([\d.]+|inf) dB")
    rows = {m[0]: m[1:] for m in re.findall(pattern, out)}
    assert set(rows) == {"my_trt", "edge_npu"}
    for name, (meta, _, weights, _, q, dq, db, ort_db) in rows.items():
        assert meta == name and int(weights) == 4 and int(dq) == int(q) + 4  # weights: integer initializers + DQ
        assert float(db) > 30.0 and float(ort_db) > 30.0
    # TensorRT's placement: the stem, two block convs and the head read quantized inputs; residual adds whose
    # skip input already feeds a quantized conv share that quantizer
    assert rows["my_trt"][1:5] == ("4", "4", "0", "4")
    # the handler's units: conv input + SiLU output each, the stem conv in/out, the adds' outputs, the head in/out
    assert rows["edge_npu"][1:5] == ("9", "4", "2", "9")
