"""The CPU that ONNX Runtime's int8 kernels run on: which one this machine is, and running ORT as another.

ORT's u8s8 kernels (QLinearConv, QGemm, QLinearMatMul, MatMulInteger) compute differently by instruction set:

- ``"vnni"``: x86 CPUs with AVX-VNNI, AVX-512 VNNI or AMX accumulate every uint8 x int8 product in int32, exactly;
- ``"avx2"``: x86 CPUs without VNNI (AVX2, AVX-512 without VNNI) add each adjacent pair of products in a
  saturating int16 first (``vpmaddubsw``), so large same-signed weight pairs can saturate.

The deployment CPU decides, not the build machine. ``run_as`` runs a model in ORT as a given target: on this
machine when it is one, else (``"avx2"`` on a VNNI machine) under ``qemu-x86_64 -cpu Haswell-v4``, a user-mode
emulator (Debian/Ubuntu: ``apt-get install qemu-user``) that runs ORT's AVX2 kernels; it is slow, for small
models and checks.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import onnxruntime as ort
import torch

from fxquant.errors import ConfigError, ExportError
from fxquant.spec import CPU_TARGETS, check_cpu_target

QEMU_CPU = {"avx2": "Haswell-v4"}  # a qemu CPU model per target this machine may not be
LEVELS = ("all", "basic")

# Runs under the emulator: onnxruntime and numpy only (importing torch there would take a minute).
_RUNNER = """
import json
import sys
import numpy as np
import onnxruntime as ort
level = sys.argv[1]
options = ort.SessionOptions()
options.graph_optimization_level = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                                    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC}[level]
options.log_severity_level = 3
for model, feeds_path, out_path in json.loads(sys.argv[2]):
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    feeds = dict(np.load(feeds_path))
    outputs = session.run(None, {i.name: feeds[f"input_{k}"] for k, i in enumerate(session.get_inputs())})
    np.savez(out_path, **{f"output_{k}": np.asarray(o) for k, o in enumerate(outputs)})
"""


@functools.cache
def host_target() -> str | None:
    """This machine's target (read with CPUID, so an emulated CPU reports itself): "vnni", "avx2", or None on a
    CPU whose int8 kernels are neither (not x86, or x86 without AVX2)."""
    caps = torch._C._cpu._get_cpu_capability()
    if any(caps.get(flag) for flag in ("avx512_vnni", "avx_vnni", "amx_int8")):
        return "vnni"
    return "avx2" if caps.get("avx2") else None


def qemu_command(target: str) -> list[str]:
    """The emulator command that runs this Python as ``target``; ExportError naming the install if missing."""
    qemu = shutil.which("qemu-x86_64")
    if target not in QEMU_CPU:
        raise ExportError(f"this machine is not a {target!r} CPU ({CPU_TARGETS[target]}) and no emulator runs one: "
                          f"run the check on such a CPU")
    if qemu is None:
        raise ExportError(f"running ONNX Runtime as a {target!r} CPU ({CPU_TARGETS[target]}) on this "
                          f"{host_target()!r} machine needs the user-mode emulator qemu-x86_64 (Debian/Ubuntu: "
                          "apt-get install qemu-user); or run the check on such a CPU")
    return [qemu, "-cpu", QEMU_CPU[target], sys.executable]


def run_as(target: str | None, model: str | os.PathLike, feeds: list[np.ndarray], level: str = "all",
           timeout_s: float = 600.0) -> list[np.ndarray]:
    """Run the ONNX file ``model`` in ORT's CPU provider as the CPU ``target`` (None: this machine) on ``feeds``
    (one array per graph input, in order), with graph optimizations ``level`` ("all": as deployed)."""
    return run_many_as(target, [(model, feeds)], level, timeout_s)[0]


def run_many_as(target: str | None, jobs: list[tuple[str | os.PathLike, list[np.ndarray]]], level: str = "all",
                timeout_s: float = 600.0) -> list[list[np.ndarray]]:
    """``run_as`` for several (model, feeds) pairs, in one emulator process where one is needed (starting it
    costs more than a small model's run)."""
    if level not in LEVELS:
        raise ConfigError(f"level must be one of {LEVELS}, got {level!r}")
    if target is None or check_cpu_target(target) == host_target():
        options = ort.SessionOptions()
        options.graph_optimization_level = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                                            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC}[level]
        results = []
        for model, feeds in jobs:
            session = ort.InferenceSession(os.fspath(model), options, providers=["CPUExecutionProvider"])
            results.append(session.run(None, {i.name: x for i, x in zip(session.get_inputs(), feeds, strict=False)}))
        return results
    command = qemu_command(target)
    with tempfile.TemporaryDirectory() as tmp:
        plan = []
        for k, (model, feeds) in enumerate(jobs):
            feeds_path, out_path = os.path.join(tmp, f"feeds{k}.npz"), os.path.join(tmp, f"outputs{k}.npz")
            np.savez(feeds_path, **{f"input_{i}": np.asarray(x) for i, x in enumerate(feeds)})
            plan.append((os.fspath(model), feeds_path, out_path))
        done = subprocess.run([*command, "-c", _RUNNER, level, json.dumps(plan)], capture_output=True, text=True,
                              timeout=timeout_s, check=False)
        if done.returncode != 0:
            lines = [ln for ln in done.stderr.splitlines() if "TCG doesn't support" not in ln]
            raise ExportError(f"ONNX Runtime failed as a {target!r} CPU under {' '.join(command[:3])}: "
                              + " | ".join(lines[-3:]))
        results = []
        for _, _, out_path in plan:
            with np.load(out_path) as out:
                results.append([out[f"output_{k}"] for k in range(len(out.files))])
        return results
