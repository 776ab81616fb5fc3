"""resnet18 and mobilenet_v2 (random weights, randomized BatchNorm statistics) through the whole pipeline."""

from __future__ import annotations

import copy
from collections import Counter

import onnx
import pytest
import torch

import fxquant
from fxquant.cli.torchvision_models import random_torchvision


@pytest.mark.parametrize(("model_name", "backend"), [
    ("resnet18", "tensorrt"), ("mobilenet_v2", "onnxruntime"),  # one per backend by default, the rest under zoo
    pytest.param("resnet18", "onnxruntime", marks=pytest.mark.zoo),
    pytest.param("mobilenet_v2", "tensorrt", marks=pytest.mark.zoo)])
def test_int8_accuracy_and_ort_agreement(model_name, backend, tmp_path):
    model = random_torchvision(model_name)
    before = copy.deepcopy(model.state_dict())
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(4, 3, 224, 224, generator=gen) for _ in range(3)]
    x = torch.randn(2, 3, 224, 224, generator=gen)
    qmodel = fxquant.quantize(model, x, batches, backend=backend, progress=False)
    with torch.no_grad():
        assert fxquant.sqnr(model(x), qmodel(x)) >= 20.0
    result = fxquant.export_onnx(qmodel, x, tmp_path / f"{model_name}_{backend}.onnx")
    onnx.checker.check_model(onnx.load(result.path), full_check=True)
    assert result.ort_sqnr_db >= 35.0
    # the user's model is untouched: same parameters and buffers, same module types, still eval
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(type(m).__name__.startswith("Quant") for m in model.modules())
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) > 0


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in graph.node for o in n.output}


def _through_qdq(name: str, producers: dict[str, onnx.NodeProto]) -> onnx.NodeProto | None:
    """The node that produced the tensor a DequantizeLinear(QuantizeLinear(.)) pair carries, if ``name`` is one."""
    dq = producers.get(name)
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    q = producers.get(dq.input[0])
    assert q is not None and q.op_type == "QuantizeLinear"
    return producers.get(q.input[0])


def test_resnet18_tensorrt_qdq_on_identity_input_only(tmp_path):
    model = random_torchvision("resnet18")
    x = torch.randn(1, 3, 224, 224)
    qmodel = fxquant.quantize(model, x, [torch.randn(2, 3, 224, 224)], backend="tensorrt", progress=False)
    proto = fxquant.export_onnx(qmodel, x, tmp_path / "r18.onnx").model
    producers = _producers(proto.graph)
    adds = [n for n in proto.graph.node if n.op_type == "Add"]
    assert len(adds) == 8
    identity_sources = Counter()
    for add in adds:
        quantized = [i for i in add.input if producers[i].op_type == "DequantizeLinear"]
        direct = [i for i in add.input if producers[i].op_type == "Conv"]
        assert len(quantized) == 1 and len(direct) == 1, add.name  # Conv output straight in: Conv+Add fuses
        source = _through_qdq(quantized[0], producers)
        identity_sources[source.op_type] += 1
        if source.op_type == "Conv":
            assert "downsample" in source.name  # the shortcut conv, never the main branch
    assert identity_sources == {"Relu": 4, "MaxPool": 1, "Conv": 3}
    # conv outputs: only the 3 downsample shortcuts are quantized; the 17 other convs feed Relu or Add directly
    quantized_convs = {producers[q.input[0]].name for q in proto.graph.node
                       if q.op_type == "QuantizeLinear" and producers.get(q.input[0]) is not None
                       and producers[q.input[0]].op_type == "Conv"}
    assert len(quantized_convs) == 3 and all("downsample" in n for n in quantized_convs)
    # weights are int8 initializers with per-channel scales; every Conv/Gemm input is dequantized
    weights = [producers[n.input[1]] for n in proto.graph.node if n.op_type in ("Conv", "Gemm")]
    assert len(weights) == 21 and all(w.op_type == "DequantizeLinear" for w in weights)
    inits = {t.name: t for t in proto.graph.initializer}
    assert all(inits[w.input[0]].data_type == onnx.TensorProto.INT8 for w in weights)
    assert all(len(inits[w.input[1]].dims) == 1 for w in weights)
