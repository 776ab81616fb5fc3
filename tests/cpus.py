"""Markers for tests that model one CPU target of ORT's int8 kernels (fxquant.lower.ort.targets).

A test that depends on the instruction set names the target it models and runs ORT as that target: natively when
this machine is one, else under qemu-x86_64 (AVX2 only: qemu's TCG emulates no AVX-512/VNNI). `.ci/run` installs
qemu-user, so CI runs both kinds on a VNNI machine; elsewhere a test skips only when its target cannot be run.
"""

from __future__ import annotations

import shutil

import pytest

from fxquant.lower.ort.targets import QEMU_CPU, host_target


def can_run_as(target: str) -> bool:
    return host_target() == target or (target in QEMU_CPU and shutil.which("qemu-x86_64") is not None)


needs_avx2 = pytest.mark.skipif(
    not can_run_as("avx2"), reason=f"models a pre-VNNI x86 CPU (AVX2); this one is {host_target()!r} and "
                                   "qemu-x86_64 is missing (apt-get install qemu-user)")
needs_vnni = pytest.mark.skipif(
    not can_run_as("vnni"), reason=f"models a VNNI/AMX CPU; this one is {host_target()!r} and no emulator runs VNNI")
