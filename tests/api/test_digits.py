"""Real data: the digits CNN keeps its accuracy at INT8 for both backends, in torch and in ONNX Runtime."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import Counter

import onnx
import pytest
import torch

import fxquant
from fxquant.cli.demo_model import accuracy
from fxquant.lower.onnx_export import ort_session, run_ort

FLOAT_WEIGHTED = {"Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul", "ConvTranspose"}


@pytest.mark.smoke
@pytest.mark.parametrize("backend", ["tensorrt", "onnxruntime"])
def test_int8_accuracy_within_half_a_point(digits, backend, tmp_path):
    model, (x_train, _, x_test, y_test) = digits
    fp32 = accuracy(model, x_test, y_test)
    assert fp32 >= 96.0
    batches = [x_train[i:i + 64] for i in range(0, 512, 64)]
    qmodel = fxquant.quantize(model, x_test[:1], batches, backend=backend, progress=False)
    assert accuracy(qmodel, x_test, y_test) >= fp32 - 0.5
    result = fxquant.export_onnx(qmodel, x_test[:32], tmp_path / f"digits_{backend}.onnx")
    assert result.ort_sqnr_db >= 35.0
    optimized = str(tmp_path / "optimized.onnx")
    # the onnxruntime preset runs as deployed (all fusions); the tensorrt preset's meaning is checked unfused
    session = ort_session(result.path, optimized_path=optimized, level="all" if backend == "onnxruntime" else "basic")
    assert accuracy(lambda x: run_ort(session, (x,))[0], x_test, y_test) >= fp32 - 0.5
    if backend == "onnxruntime":
        ops = Counter(n.op_type for n in onnx.load(optimized).graph.node)
        assert not FLOAT_WEIGHTED & set(ops), ops
        assert ops["QLinearConv"] == 8 and ops["QLinearAdd"] == 3 and ops["QGemm"] == 1, ops
        # adaptive average pooling is exported as GlobalAveragePool, which ORT fuses (ReduceMean it cannot)
        assert ops["QLinearGlobalAveragePool"] == 1 and "ReduceMean" not in ops, ops


@pytest.mark.zoo  # README command 1 runs the demo too
def test_demo_command_prints_int8_accuracy(tmp_path):
    out = subprocess.run([sys.executable, "-m", "fxquant", "demo", "--out", str(tmp_path)], capture_output=True,
                         text=True, timeout=600, check=True).stdout
    rows = {m[0]: [float(v) for v in m[1:]] for m in
            re.findall(r"^(tensorrt|onnxruntime)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)", out, re.M)}
    assert set(rows) == {"tensorrt", "onnxruntime"}, out
    for fp32_torch, int8_torch, fp32_ort, int8_ort in rows.values():
        assert fp32_torch >= 96.0 and abs(fp32_ort - fp32_torch) < 0.3
        assert int8_torch >= fp32_torch - 0.5 and int8_ort >= fp32_ort - 0.5
    for backend in rows:
        onnx.checker.check_model(str(tmp_path / f"digits_{backend}.onnx"))


@pytest.mark.parametrize("backend", ["tensorrt", "onnxruntime"])
def test_prepared_and_converted_models_agree_bit_for_bit(digits, backend):
    # the calibrated (fake-quant) model that sensitivity analysis and QAT use is the model convert freezes and
    # ONNX runs: at W4A4 on digits pixels, where rounding ties are frequent, their logits are identical
    model, (x_train, _, x_test, _) = digits
    w4a4 = fxquant.QuantConfig(weight=fxquant.QuantSpec(num_bits=4, axis=0, narrow_range=True),
                               activation=fxquant.BACKENDS[backend].activation.with_(num_bits=4))
    prepared = fxquant.prepare(model, x_test[:1], backend=backend, config=w4a4)
    fxquant.calibrate(prepared, [x_train[i:i + 64] for i in range(0, 256, 64)], progress=False)
    with torch.no_grad():
        assert torch.equal(prepared(x_test), fxquant.convert(prepared)(x_test))


_TRAIN = """
import sys, torch
from fxquant.cli.demo_model import load_digits_split, train_digits
torch.set_num_threads(2)
model = train_digits(epochs=3, seed=0, data=load_digits_split(seed=0))
torch.save(model.state_dict(), sys.argv[1])
"""


@pytest.mark.zoo  # two trainings in subprocesses: about a minute on 2 cores
def test_digits_training_gives_the_same_weights_with_avx2_and_avx512_kernels(tmp_path):
    """Tests pin accuracy margins on models trained here, so training must not depend on the CPU: the same seed
    gives the same float32 weights whether torch runs its AVX2 or AVX-512 kernels (float64 training keeps the
    different summation orders far below float32's resolution). A CPU without AVX-512 has nothing to compare (an
    AVX-512 run would stop on an illegal instruction): skipped there."""
    if "AVX512" not in torch.backends.cpu.get_cpu_capability():
        pytest.skip(f"this CPU's best torch kernels are {torch.backends.cpu.get_cpu_capability()}: no AVX-512 run")
    weights = {}
    for isa in ("avx2", "avx512"):
        env = {**os.environ, "ATEN_CPU_CAPABILITY": isa, "ONEDNN_MAX_CPU_ISA": "AVX2" if isa == "avx2" else "ALL",
               "MKL_ENABLE_INSTRUCTIONS": "AVX2" if isa == "avx2" else "AVX512"}
        out = subprocess.run([sys.executable, "-c", _TRAIN, str(tmp_path / f"{isa}.pt")], env=env,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        weights[isa] = torch.load(tmp_path / f"{isa}.pt")
    worst = max(float((weights["avx2"][k].float() - weights["avx512"][k].float()).abs().max()) for k in weights["avx2"])
    assert worst <= 1e-6, worst
