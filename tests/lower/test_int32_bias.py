"""Dead channels (a BatchNorm folded with gamma ~ 0, common in pretrained CNNs: EfficientNet-Lite0 has 22 layers with
one) must not cost a layer its int8 kernel: convert widens exactly those channels' weight step until their bias
fits int32 codes, so every Conv runs as QLinearConv in ONNX Runtime and torch computes the same."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import torch
from onnx import numpy_helper
from torch import nn

import fxquant
from fxquant.metrics import sqnr


def _dead_channel_net() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 8, 1), nn.BatchNorm2d(8)).eval()
    with torch.no_grad():
        for bn in (model[1], model[4], model[7]):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-1.0, 1.0)
        model[1].weight[[2, 9]] = torch.tensor([3e-6, -1e-6])  # dead channels that still carry a bias
        model[1].bias[[2, 9]] = torch.tensor([-2.0, 0.7])
        model[4].weight[5] = 2e-6
        model[4].bias[5] = -1.5
    return model


def test_dead_channels_keep_every_conv_fused_with_an_int32_bias(tmp_path):
    # before: the three layers' biases needed more than 2^31 codes at s_x * s_w; export moved them into float Adds
    # and ORT ran those convs in float (EfficientNet-Lite0: int8 0.38x the fp32 speed; now 1.5x on AMD EPYC)
    model = _dead_channel_net()
    x = torch.randn(8, 3, 16, 16)
    before = copy.deepcopy(model.state_dict())
    prepared = fxquant.prepare(model, x[:1], backend="onnxruntime")
    fxquant.calibrate(prepared, [x[:4], x[4:]], progress=False)
    qmodel = fxquant.convert(prepared)
    widened = fxquant.report_of(qmodel).ptq["int32_bias"]
    assert widened.data == {"0": {"channels": 2, "of": 16}, "3": {"channels": 1, "of": 16}}
    assert "int32_bias" not in fxquant.report_of(prepared).ptq  # the calibrated model's report is its own
    with torch.no_grad():
        assert sqnr(prepared(x), qmodel(x)) > 80  # the widened channels' weights were all but zero
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an unfused op would warn
        result = fxquant.export_onnx(qmodel, x[:1], tmp_path / "dead.onnx", check_latency=False)
    assert result.fusion.intended == 3 and result.fusion.unfused == []
    assert result.fusion.optimized_ops.get("QLinearConv") == 3 and "Conv" not in result.fusion.optimized_ops
    assert not [n.name for n in result.model.graph.node if n.op_type == "Add"]
    inits = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    codes = [v for k, v in inits.items() if k.endswith("bias_quantized")]
    assert len(codes) == 3 and all(c.dtype == np.int32 for c in codes)
    assert max(int(np.abs(c).max()) for c in codes) > 2**30  # the dead channels' codes: near the int32 limit
    assert result.ort_sqnr_db > 30
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the user's model is untouched


def test_a_backend_without_int32_biases_keeps_the_weight_steps():
    model = _dead_channel_net()
    x = torch.randn(8, 3, 16, 16)
    prepared = fxquant.prepare(model, x[:1], backend="tensorrt")  # TensorRT adds biases in float
    fxquant.calibrate(prepared, [x], progress=False)
    qmodel = fxquant.convert(prepared)
    assert "int32_bias" not in fxquant.report_of(qmodel).ptq
    calibrated = prepared.get_submodule("0.weight_quantizer").scale
    assert torch.equal(qmodel.get_submodule("0.weight_quantizer").scale, calibrated)
    step_x = qmodel.get_submodule("input_1_to__0_quantizer").scale
    assert 2.0 / (step_x * 2**31) > calibrated[2]  # the dead channel's bias would not fit int32 codes
