"""Where and when a benchmark ran, recorded beside its figures in benchmarks/results/*.json.

docs/benchmarks.md is rendered from those files (benchmarks/make_docs.py), so every results file should carry
the command that wrote it and this environment block.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from pathlib import Path

import onnxruntime
import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _cpuinfo(key: str) -> str:
    try:
        with open("/proc/cpuinfo") as f:
            line = next((ln for ln in f if ln.startswith(key)), "")
    except OSError:
        return ""
    return line.split(":", 1)[1].strip() if line else ""


def cpu_name() -> str:
    return _cpuinfo("model name") or platform.processor() or "unknown CPU"


def cpu_isa() -> str:
    flags = set(_cpuinfo("flags").split())
    if not flags:
        return "ISA unknown"
    best = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    vnni = flags & {"avx512_vnni", "avx_vnni"}
    return f"{best}, {'with VNNI' if vnni else 'no VNNI'}"


def environment() -> dict:
    """Date (UTC), machine and library versions of this run."""
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
            "machine": f"{os.cpu_count()}-core {cpu_name()} ({cpu_isa()})",
            "loadavg_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
            "python": platform.python_version(), "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__}


def command() -> str:
    """The command line of this run, as it would be typed from the repository root."""
    return " ".join(["python", *sys.argv])


def write_results(name: str, rows: list[dict], settings: dict | None = None) -> Path:
    """Write ``rows`` (the printed table, one dict per row) to benchmarks/results/<name>.json with the command,
    settings and environment; returns the path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    payload = {"command": command(), "settings": settings or {}, "environment": environment(), "rows": rows}
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return path
