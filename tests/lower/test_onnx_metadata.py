"""ONNX niceties: node names map back to modules, metadata says what made the model, shapes are inferred."""

from __future__ import annotations

import warnings

import onnx
import pytest
import torch
from torch import nn

import fxquant
from fxquant import Override, QuantConfig, QuantSpec
from fxquant.backends import get_backend
from fxquant.lower.onnx_export import _low_agreement_cause
from tests.cpus import needs_vnni


class Named(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(x))
        y = self.block(y) + y
        return self.head(torch.flatten(y.mean((2, 3)), 1))


def export(tmp_path, backend: str, config: QuantConfig | None = None) -> tuple[onnx.ModelProto, nn.Module]:
    torch.manual_seed(0)
    model = Named().eval()
    x = torch.randn(8, 3, 12, 12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qmodel = fxquant.quantize(model, x[:1], [x], backend=backend, config=config, progress=False)
    result = fxquant.export_onnx(qmodel, x[:4], tmp_path / f"{backend}.onnx")
    assert result.ort_sqnr_db >= 30.0
    return onnx.load(result.path), qmodel


@pytest.mark.parametrize("backend", ["tensorrt", "onnxruntime"])
def test_node_names_map_back_to_modules(tmp_path, backend):
    proto, qmodel = export(tmp_path, backend)
    modules = dict(qmodel.named_modules())
    names = {n.name: n for n in proto.graph.node}
    assert len(names) == len(proto.graph.node)  # unique
    weighted = {name for name, n in names.items() if n.op_type in ("Conv", "Gemm")}
    assert weighted == {"conv/Conv", "block.0/Conv", "head/Gemm"}
    for name, node in names.items():
        prefix = name.rsplit("/", 1)[0]
        assert prefix, name
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            assert prefix in modules or prefix.endswith("bias_quantizer"), name


@pytest.mark.smoke
def test_metadata_and_shape_inference(tmp_path):
    config = QuantConfig(activation=QuantSpec(8, symmetric=False, calib_method="percentile"),
                         overrides=(Override("head", exclude=True),))
    proto, qmodel = export(tmp_path, "onnxruntime", config)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert (proto.producer_name, proto.producer_version) == ("fxquant", fxquant.__version__)
    assert meta["fxquant.version"] == fxquant.__version__
    assert (meta["fxquant.backend"], meta["fxquant.calib_method"], meta["fxquant.weight_calib_method"]) == (
        "onnxruntime", "percentile", "max")
    float_ops = meta["fxquant.float_ops"].split(",")
    assert "head" in float_ops and float_ops == [e.node for e in fxquant.report_of(qmodel).float_ops]
    typed = {v.name: v for v in (*proto.graph.value_info, *proto.graph.output)}
    outputs = [o for n in proto.graph.node for o in n.output]
    assert all(o in typed for o in outputs), [o for o in outputs if o not in typed]
    conv_out = next(n for n in proto.graph.node if n.name == "block.0/Conv").output[0]
    dims = typed[conv_out].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims[1:]] == [8, 12, 12] and dims[0].dim_param  # symbolic batch


def test_tensorrt_metadata_defaults(tmp_path):
    proto, _ = export(tmp_path, "tensorrt")
    meta = {p.key: p.value for p in proto.metadata_props}
    assert (meta["fxquant.backend"], meta["fxquant.calib_method"], meta["fxquant.float_ops"]) == (
        "tensorrt", get_backend("tensorrt").activation.calib_method, "")


EIGHT_BIT_WEIGHTS = QuantConfig(weight=QuantSpec(8, axis=0, narrow_range=True))


@pytest.mark.parametrize(("backend", "config", "cpu", "cause"), [
    ("onnxruntime", QuantConfig(weight=QuantSpec(4, axis=0, narrow_range=True),
                                activation=QuantSpec(4, symmetric=False)), None, "With 4-bit quantizers"),
    # the CPU ORT runs as decides: pre-VNNI x86 (AVX2) saturates 8-bit weight pairs, VNNI/AMX accumulate exactly
    ("onnxruntime", EIGHT_BIT_WEIGHTS, "avx2", "u8s8 saturation"),
    ("tensorrt", None, None, "int8-vs-fp32 SQNR"),
])
def test_low_agreement_warning_names_the_likely_cause(tmp_path, monkeypatch, backend, config, cpu, cause):
    """The warning's advice fits the model and the CPU ORT ran as: narrow widths, 8-bit weights on an x86 CPU
    without VNNI (run as one under qemu when this machine has VNNI), or neither."""
    monkeypatch.setattr("fxquant.lower.onnx_export.MIN_AGREEMENT_DB", float("inf"))  # always warn
    torch.manual_seed(0)
    x = torch.randn(8, 3, 12, 12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qmodel = fxquant.quantize(Named().eval(), x[:1], [x], backend=backend, config=config, progress=False)
    with pytest.warns(UserWarning, match="agrees with the fake-quant model at only") as record:
        fxquant.export_onnx(qmodel, x[:4], tmp_path / "m.onnx", check_cpu=cpu)
    messages = [str(w.message) for w in record if "agrees with" in str(w.message)]
    assert len(messages) == 1 and cause in messages[0], messages


@needs_vnni
def test_eight_bit_weights_on_a_vnni_cpu_agree_and_are_not_blamed_on_saturation(tmp_path):
    """VNNI/AMX accumulate u8s8 products exactly: the same plain 8-bit model that saturates as AVX2 agrees with
    the fake-quant model here, and a low agreement would not be put down to saturation."""
    torch.manual_seed(0)
    x = torch.randn(8, 3, 12, 12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qmodel = fxquant.quantize(Named().eval(), x[:1], [x], backend="onnxruntime", config=EIGHT_BIT_WEIGHTS,
                                  progress=False)
        result = fxquant.export_onnx(qmodel, x[:4], tmp_path / "m.onnx", check_cpu="vnni")
    assert result.ort_sqnr_db >= 40.0
    backend = get_backend("onnxruntime")
    assert "saturation" not in _low_agreement_cause(qmodel, backend, "vnni")
    assert "saturation" in _low_agreement_cause(qmodel, backend, "avx2")
