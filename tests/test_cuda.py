"""Quantizers, calibrators and histograms on CUDA agree with CPU (run with: pytest -m cuda; skipped without a GPU).

Exact where the arithmetic is exact on both devices (min/max, histogram counts, division and round half to even);
within float noise where the computation itself differs (cuDNN convolutions, float64 logs in the entropy search).
"""

import copy
import warnings

import pytest
import torch
from torch import nn

import fxquant
from fxquant import QuantConfig, QuantSpec, TensorQuantizer

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available())")]

SPECS = {
    "max": QuantSpec(), "max-per-channel": QuantSpec(axis=1), "affine": QuantSpec(symmetric=False),
    "percentile": QuantSpec(calib_method="percentile", percentile=99.9), "entropy": QuantSpec(calib_method="entropy"),
    "mse": QuantSpec(calib_method="mse"), "ema-affine": QuantSpec(calib_method="ema", symmetric=False),
    "unsigned-4bit": QuantSpec(num_bits=4, unsigned=True),
}


def _batches(positive: bool = False) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = [torch.randn(8, 16, 12, 12, generator=g) * (1 + torch.rand(8, 16, 12, 12, generator=g) ** 8 * 10)
           for _ in range(4)]
    return [b.abs() for b in out] if positive else out


def _calibrated(spec: QuantSpec, device: str) -> TensorQuantizer:
    q = TensorQuantizer(spec).to(device)
    q.set_mode("calib")
    for batch in _batches(spec.unsigned):
        q(batch.to(device))
    q.load_calib_amax()
    q.set_mode("quant")
    return q


@pytest.mark.parametrize("name", list(SPECS))
def test_calibration_and_fake_quant_agree_with_cpu(name):
    spec = SPECS[name]
    cpu, gpu = _calibrated(spec, "cpu"), _calibrated(spec, "cuda")
    assert gpu._min.device.type == "cuda" and gpu.scale.device.type == "cuda"
    if name in ("entropy", "mse"):  # float64 logs / matmul reductions may round differently: a near-tie may
        torch.testing.assert_close(gpu._max.cpu(), cpu._max, rtol=1e-2, atol=0)  # pick a neighbouring bin
        gpu._min, gpu._max = cpu._min.cuda(), cpu._max.cuda()
    else:
        assert torch.equal(gpu._min.cpu(), cpu._min) and torch.equal(gpu._max.cpu(), cpu._max)
    x = _batches(spec.unsigned)[0]
    out = gpu(x.cuda())
    assert out.device.type == "cuda" and torch.equal(out.cpu(), cpu(x))


def test_range_follows_the_input_device():
    q = TensorQuantizer(QuantSpec(amax=2.0))  # the fixed range is created on the CPU
    x = torch.randn(100, device="cuda")
    assert torch.equal(q(x).cpu(), q(x.cpu()))
    q.cuda()
    q.amax = 1.5
    assert q._max.device.type == "cuda" and q.scale.device.type == "cuda"
    dynamic = TensorQuantizer(QuantSpec(axis=0, scale_amax=0.5))
    out = dynamic(x.view(10, 10))
    assert out.device.type == "cuda" and dynamic.scale.device.type == "cuda"
    assert torch.equal(out.cpu(), TensorQuantizer(QuantSpec(axis=0, scale_amax=0.5))(x.view(10, 10).cpu()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_tensor_quant_is_bit_exact_on_cuda(dtype):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(100_000, generator=g) * 3).to(dtype)
    amax = torch.rand(100_000, generator=g) * 4 + 1e-2
    codes, scale = fxquant.tensor_quant(x, amax)
    codes_gpu, scale_gpu = fxquant.tensor_quant(x.cuda(), amax.cuda())
    assert codes_gpu.dtype == dtype and torch.equal(codes_gpu.cpu(), codes) and torch.equal(scale_gpu.cpu(), scale)
    assert torch.equal(fxquant.fake_tensor_quant(x.cuda(), amax.cuda()).cpu(), fxquant.fake_tensor_quant(x, amax))


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(16, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.conv2(self.relu(self.conv1(x)))


@pytest.mark.parametrize("backend, method", [("tensorrt", "max"), ("tensorrt", "entropy"),
                                             ("onnxruntime", "percentile")])
def test_calibrate_and_convert_on_cuda_agree_with_cpu(backend, method):
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    config = QuantConfig(activation=QuantSpec(calib_method=method, symmetric=backend == "tensorrt"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = fxquant.prepare(_Net().eval(), torch.zeros(1, 16, 12, 12), backend=backend, config=config)
    on_gpu = copy.deepcopy(prepared).cuda()
    batches = _batches()
    fxquant.calibrate(prepared, batches, progress=False)
    fxquant.calibrate(on_gpu, [b.cuda() for b in batches], progress=False)
    for (name, a), (_, b) in zip(prepared.named_modules(), on_gpu.named_modules(), strict=True):
        if isinstance(a, TensorQuantizer):
            assert b.scale.device.type == "cuda", name
            torch.testing.assert_close(b.scale.cpu(), a.scale, rtol=1e-3, atol=0, msg=name)
    x = batches[0]
    converted, converted_gpu = fxquant.convert(prepared), fxquant.convert(on_gpu)
    with torch.no_grad():
        ref, got = converted(x), converted_gpu(x.cuda())
        fake_gpu = on_gpu(x.cuda())
    assert got.device.type == "cuda"
    assert fxquant.sqnr(ref, got.cpu()) > 30
    assert fxquant.sqnr(fake_gpu.cpu(), got.cpu()) > 40  # prepared and converted agree on the GPU too
