"""Compiler speed: fxquant's prepare + calibrate(one batch) + convert against torch.ao's prepare_fx +
calibrate(one batch) + convert_fx, on the same models in the same run; and growth with graph size.

    python benchmarks/bench_compiler.py [--repeats 5]

Each measurement is repeated, interleaving the two tools, and the median is reported (the machine is shared).
fxquant's time includes the deep copy its prepare() makes of the user's model; torch.ao's does not.
Linearity: a stack of N residual blocks (conv-bn-relu-conv-bn, add, relu) at three depths; the slope of
time against graph nodes is fitted by least squares and R^2 reported. Writes benchmarks/results/compiler_speed.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
import warnings

import torch
import torchvision
from doc_tables import compiler_speed as markdown
from torch import nn
from torch.ao.quantization import get_default_qconfig_mapping
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

import fxquant

RESULTS = os.path.join(os.path.dirname(__file__), "results", "compiler_speed.json")


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(x + self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))))


def residual_stack(n: int, c: int = 8) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, c, 3, padding=1), *(Block(c) for _ in range(n)),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10)).eval()


def run_fxquant(model: nn.Module, x: torch.Tensor) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = fxquant.prepare(model, x, backend="tensorrt")
    fxquant.calibrate(prepared, [x], progress=False)
    return len(fxquant.convert(prepared).graph.nodes)


def run_torch_ao(model: nn.Module, x: torch.Tensor) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_fx(model, get_default_qconfig_mapping("fbgemm"), (x,))
        with torch.no_grad():
            prepared(x)
        return len(convert_fx(prepared).graph.nodes)


def timed(fn, model: nn.Module, x: torch.Tensor) -> float:
    model = copy.deepcopy(model)  # torch.ao's prepare_fx fuses modules of the model it is given
    t = time.perf_counter()
    fn(model, x)
    return time.perf_counter() - t


def compare(model: nn.Module, x: torch.Tensor, repeats: int) -> dict:
    times: dict[str, list[float]] = {"fxquant": [], "torch_ao": []}
    for _ in range(repeats):  # interleaved, so load from other processes hits both alike
        times["fxquant"].append(timed(run_fxquant, model, x))
        times["torch_ao"].append(timed(run_torch_ao, model, x))
    with torch.no_grad():
        forward = statistics.median(_forward_time(model, x) for _ in range(repeats))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"fxquant_s": round(med["fxquant"], 3), "torch_ao_s": round(med["torch_ao"], 3),
            "ratio_fxquant_over_torch_ao": round(med["fxquant"] / med["torch_ao"], 3),
            "fp32_forward_s": round(forward, 3), "runs": {k: [round(t, 3) for t in v] for k, v in times.items()}}


def _forward_time(model: nn.Module, x: torch.Tensor) -> float:
    t = time.perf_counter()
    model(x)
    return time.perf_counter() - t


def fit(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """Least-squares slope, intercept and R^2."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((a - mx) ** 2 for a in xs)
    slope = sum((a - mx) * (b - my) for a, b in zip(xs, ys, strict=True)) / sxx
    intercept = my - slope * mx
    ss_res = sum((b - (slope * a + intercept)) ** 2 for a, b in zip(xs, ys, strict=True))
    ss_tot = sum((b - my) ** 2 for b in ys)
    return slope, intercept, 1 - ss_res / ss_tot


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", default="resnet50,maxvit_t")
    parser.add_argument("--depths", default="16,32,64")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out: dict = {"models": {}, "growth": {}}
    x = torch.randn(1, 3, 224, 224)
    for name in args.models.split(","):
        model = getattr(torchvision.models, name)().eval()
        nodes = len(torch.fx.symbolic_trace(model).graph.nodes)
        out["models"][name] = {"traced_nodes": nodes, **compare(model, x, args.repeats)}
        print(name, json.dumps(out["models"][name]), flush=True)
    small = torch.randn(1, 3, 16, 16)
    for depth in map(int, args.depths.split(",")):
        model = residual_stack(depth)
        nodes = len(torch.fx.symbolic_trace(model).graph.nodes)
        out["growth"][depth] = {"traced_nodes": nodes, **compare(model, small, args.repeats)}
        print(depth, json.dumps(out["growth"][depth]), flush=True)
    nodes = [g["traced_nodes"] for g in out["growth"].values()]
    for tool in ("fxquant", "torch_ao"):
        ys = [g[f"{tool}_s"] for g in out["growth"].values()]
        slope, intercept, r2 = fit(nodes, ys)
        out[f"{tool}_fit"] = {"seconds_per_node": slope, "intercept_s": intercept, "r2": r2,
                              "ms_per_node_each_size": [round(1000 * y / n, 3) for y, n in zip(ys, nodes, strict=True)]}
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as f:
        json.dump(out, f, indent=1)
    print(markdown(out))


if __name__ == "__main__":
    main()
