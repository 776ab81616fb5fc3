"""Run a test file's worker ranks as separate processes over gloo on the loopback interface (shared by the
distributed calibration and QAT tests; each test file is also the workers' script)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(script: str, world: int, args: Callable[[int, int, Path], list[str]], outs: list[Path],
          timeout_s: float, what: str) -> list:
    """Start ``python script *args(rank, port, outs[rank])`` for every rank, wait at most ``timeout_s`` (then
    kill them all and fail: a collective hung), require exit code 0, and return what each rank saved."""
    # the script imports ``tests.gloo_workers`` (and fxquant) from the repo root, which a script's sys.path lacks
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONPATH=path)
    if Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    port = free_port()
    procs = [subprocess.Popen([sys.executable, script, *args(r, port, outs[r])], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(world)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout_s)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"{what} did not finish in {timeout_s} s: a collective hung")
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} failed:\n{logs[r][-4000:]}"
    return [torch.load(o, weights_only=False) for o in outs]
