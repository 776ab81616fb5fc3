"""Calibration speed on torchvision resnet50 (CPU): every fxquant calib method vs torch.ao's HistogramObserver flow.

What is measured, in one run, for 4 batches of 8 x 3 x 224 x 224 ``torch.randn`` images (``torch.manual_seed(0)``)
through resnet50 with random weights in eval mode, ``torch.set_num_threads(2)``:

* fp32: the plain model's forward over the 4 batches (``torch.no_grad``, eval).
* fxquant, per calib method (max, ema, percentile, entropy, mse): ``fxquant.prepare`` with
  ``QuantConfig(activation=<backend default>.with_(calib_method=m))`` (weights keep the backend default:
  per-channel, 'max'), timed on its own; then ``fxquant.calibrate(prepared, batches)`` timed as a whole (forwards
  with calibrators + computing every range), which is the number the ratio uses; ``convert`` is timed too.
* torch.ao: ``prepare_fx(deepcopy(model), QConfigMapping().set_global(QConfig(
  activation=HistogramObserver.with_args(reduce_range=False), weight=default_per_channel_weight_observer)),
  example_inputs)`` (timed with the deepcopy, as fxquant.prepare copies too); the 4 forwards (``torch.no_grad``);
  then every observer's ``calculate_qparams()`` (HistogramObserver searches its range there, i.e. at convert
  time, while fxquant computes ranges inside ``calibrate``); then ``convert_fx`` (which calls
  ``calculate_qparams`` again). torch.ao's ratio is reported both for the forwards alone and for
  forwards + ``calculate_qparams`` (the like-for-like number for ``fxquant.calibrate``).

Ratio = calibration wall time / fp32 forward wall time. The machine may be shared, so every configuration is
timed right after its own fp32 measurement (paired) and the order of configurations rotates between repeats.
Before each pair the script waits (up to ``--max-wait`` s) for the other processes to go quiet, and it measures
from /proc/stat how much of the machine's CPU they used during the pair: a pair where they used
``--quiet-threshold`` (10%) or more is not clean and is retried (up to ``--max-attempts``). The table gives, over
the clean pairs, the median paired ratio with its min-max and min(calib) / min(fp32) (noise only adds time);
every try is in the JSON. Process CPU time is recorded as well.

With ``--profile`` (default on) one extra instrumented calibration per configuration splits its time into
forward compute, calibrator ``collect`` (activations vs per-channel weights), range computation
(``load_calib_amax`` / ``calculate_qparams``), and lists the top aten ops by self CPU time (torch.profiler).

Run::

    python benchmarks/bench_calibration.py [--repeats 3] [--backends tensorrt onnxruntime]
        [--no-profile] [--quiet-threshold 0.1] [--max-attempts 4] [--max-wait 60]
        [--out benchmarks/results/calibration_speed.json]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path

import torch
import torchvision
from quiet import timed, wait_for_quiet

import fxquant
from fxquant.backends import get_backend
from fxquant.calib import HISTOGRAM_METHODS
from fxquant.quantizer import TensorQuantizer

METHODS = ("max", "ema", "percentile", "entropy", "mse")
TARGETS = {"default": 1.1, "histogram": 1.6}
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "calibration_speed.json"


def silence_warnings() -> None:
    """torch.ao's deprecation notices, fxquant's float-op notes and torch.fx/quantization chatter."""
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)


@torch.no_grad()
def forward_all(model: torch.nn.Module, batches: list[torch.Tensor]) -> None:
    for b in batches:
        model(b)


# ---- one configuration ---------------------------------------------------------------------------------------
def fxquant_config(backend: str, method: str) -> fxquant.QuantConfig:
    return fxquant.QuantConfig(activation=get_backend(backend).activation.with_(calib_method=method))


def run_fxquant(model, batches, backend: str, method: str) -> dict:
    with timed() as prep:
        prepared = fxquant.prepare(model, batches[0], backend=backend, config=fxquant_config(backend, method))
    with timed() as calib:
        fxquant.calibrate(prepared, batches, progress=False)
    with timed() as conv:
        fxquant.convert(prepared)
    quantizers = [m for m in prepared.modules() if isinstance(m, TensorQuantizer)]
    return {"prepare": prep, "calibrate": calib, "convert": conv, "quantizers": len(quantizers)}


def ao_qconfig_mapping():
    from torch.ao.quantization import QConfig, QConfigMapping, default_per_channel_weight_observer
    from torch.ao.quantization.observer import HistogramObserver

    return QConfigMapping().set_global(QConfig(activation=HistogramObserver.with_args(reduce_range=False),
                                               weight=default_per_channel_weight_observer))


def ao_observers(prepared):
    from torch.ao.quantization.observer import ObserverBase

    return [m for m in prepared.modules() if isinstance(m, ObserverBase)]


def run_ao(model, batches) -> dict:
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    with timed() as prep:
        prepared = prepare_fx(copy.deepcopy(model), ao_qconfig_mapping(), (batches[0],))
    with timed() as fwd:
        forward_all(prepared, batches)
    observers = ao_observers(prepared)
    with timed() as qparams:
        for obs in observers:
            obs.calculate_qparams()
    with timed() as conv:
        convert_fx(prepared)
    calib = {k: fwd[k] + qparams[k] for k in fwd}
    return {"prepare": prep, "forwards": fwd, "calculate_qparams": qparams, "calibrate": calib, "convert": conv,
            "observers": len(observers)}


# ---- instrumented pass -----------------------------------------------------------------------------------------
@contextlib.contextmanager
def patched(cls, name: str, bucket: dict, key_of):
    """Accumulate the wall time of ``cls.name`` calls into ``bucket[key_of(self)]``."""
    original = getattr(cls, name)

    def wrapper(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            bucket[key_of(self)] += time.perf_counter() - start

    setattr(cls, name, wrapper)
    try:
        yield
    finally:
        setattr(cls, name, original)


def top_ops(prof, n: int) -> list[dict]:
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:n]
    return [{"op": e.key, "self_cpu_s": e.self_cpu_time_total / 1e6, "calls": e.count} for e in rows]


def profile_fxquant(model, batches, backend: str, method: str, n_ops: int) -> dict:
    prepared = fxquant.prepare(model, batches[0], backend=backend, config=fxquant_config(backend, method))
    bucket: dict[str, float] = defaultdict(float)
    collectors = {type(q.calibrator) for q in prepared.modules() if isinstance(q, TensorQuantizer)}
    with contextlib.ExitStack() as stack:
        for cls in collectors:
            stack.enter_context(patched(cls, "collect", bucket,
                                        lambda c: "collect_weights" if c.axis is not None else "collect_activations"))
        stack.enter_context(patched(TensorQuantizer, "load_calib_amax", bucket, lambda q: "compute_ranges"))
        with timed() as total:
            fxquant.calibrate(prepared, batches, progress=False)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fxquant.calibrate(prepared, batches, progress=False)
    split = {k: round(v, 4) for k, v in bucket.items()}
    split["total"] = round(total["wall"], 4)
    split["forward_and_rest"] = round(total["wall"] - sum(bucket.values()), 4)
    split["other_processes_share"] = round(total["foreign"], 3)
    return {"split_s": split, "top_ops_second_run": top_ops(prof, n_ops)}


def profile_ao(model, batches, n_ops: int) -> dict:
    from torch.ao.quantization.observer import HistogramObserver, PerChannelMinMaxObserver
    from torch.ao.quantization.quantize_fx import prepare_fx

    prepared = prepare_fx(copy.deepcopy(model), ao_qconfig_mapping(), (batches[0],))
    bucket: dict[str, float] = defaultdict(float)
    with patched(HistogramObserver, "forward", bucket, lambda o: "observe_activations"), \
            patched(PerChannelMinMaxObserver, "forward", bucket, lambda o: "observe_weights"):
        with timed() as fwd:
            forward_all(prepared, batches)
    with timed() as qparams:
        for obs in ao_observers(prepared):
            obs.calculate_qparams()
    split = {k: round(v, 4) for k, v in bucket.items()}
    split["forward_and_rest"] = round(fwd["wall"] - sum(bucket.values()), 4)
    split["compute_ranges"] = round(qparams["wall"], 4)
    split["total"] = round(fwd["wall"] + qparams["wall"], 4)
    split["other_processes_share"] = round(max(fwd["foreign"], qparams["foreign"]), 3)
    prepared = prepare_fx(copy.deepcopy(model), ao_qconfig_mapping(), (batches[0],))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        forward_all(prepared, batches)
        for obs in ao_observers(prepared):
            obs.calculate_qparams()
    return {"split_s": split, "top_ops": top_ops(prof, n_ops)}


# ---- summary -------------------------------------------------------------------------------------------------
def summarize(attempts: list[dict]) -> dict:
    """Medians and spreads over the clean measurements (all of them, flagged, when none was clean)."""
    clean = [r for r in attempts if r["clean"]]
    records = clean or attempts
    ratios = [r["calibrate"]["wall"] / r["fp32"]["wall"] for r in records]
    cpu_ratios = [r["calibrate"]["cpu"] / r["fp32"]["cpu"] for r in records]
    out = {
        "n_clean": len(clean), "n_attempts": len(attempts), "used": "clean" if clean else "all (none clean)",
        "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
        "ratio_of_minima": min(r["calibrate"]["wall"] for r in records) / min(r["fp32"]["wall"] for r in records),
        "cpu_ratio_median": statistics.median(cpu_ratios),
        "fp32_s_median": statistics.median(r["fp32"]["wall"] for r in records),
        "prepare_s_median": statistics.median(r["prepare"]["wall"] for r in records),
        "calibrate_s_median": statistics.median(r["calibrate"]["wall"] for r in records),
        "convert_s_median": statistics.median(r["convert"]["wall"] for r in records),
    }
    if "forwards" in records[0]:
        fwd = [r["forwards"]["wall"] / r["fp32"]["wall"] for r in records]
        out.update(forwards_ratio_median=statistics.median(fwd), forwards_ratio_min=min(fwd),
                   forwards_ratio_max=max(fwd),
                   calculate_qparams_s_median=statistics.median(r["calculate_qparams"]["wall"] for r in records))
    return out


def target_for(backend: str, method: str) -> str:
    """The backend's default calibrator must stay <= 1.3x, a histogram method <= 1.6x."""
    if method == get_backend(backend).activation.calib_method:
        return f"<= {TARGETS['default']} (backend default)"
    return f"<= {TARGETS['histogram']}" if method in HISTOGRAM_METHODS else "-"


def git_state() -> dict:
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "fxquant"], cwd=root, capture_output=True,
                               text=True).stdout.split("\n")
        return {"commit": head, "fxquant_uncommitted": [d.strip() for d in dirty if d.strip()]}
    except OSError:
        return {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backends", nargs="+", default=["tensorrt"], choices=["tensorrt", "onnxruntime"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--no-ao", action="store_true", help="skip torch.ao's flow")
    parser.add_argument("--no-profile", action="store_true", help="skip the instrumented/profiled pass")
    parser.add_argument("--top-ops", type=int, default=10)
    parser.add_argument("--quiet-threshold", type=float, default=0.10,
                        help="a measurement is clean when other processes used less than this share of the "
                             "machine's CPU capacity during it (from /proc/stat)")
    parser.add_argument("--max-attempts", type=int, default=4, help="tries per configuration and repeat to get a "
                        "clean fp32 + calibration pair")
    parser.add_argument("--max-wait", type=float, default=60.0, help="seconds to wait for a quiet machine before "
                        "each try")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    silence_warnings()
    torch.set_num_threads(args.threads)
    model = getattr(torchvision.models, args.model)().eval()
    torch.manual_seed(0)
    batches = [torch.randn(args.batch_size, 3, 224, 224) for _ in range(args.batches)]
    configs = [("fxquant", b, m) for b in args.backends for m in args.methods]
    if not args.no_ao:
        configs.append(("torch.ao", "fbgemm-like", "HistogramObserver"))
    start_all = time.perf_counter()

    # warm-up: oneDNN primitives, allocator, one calibration of each flow on one batch
    forward_all(model, batches[:1])
    run_fxquant(model, batches[:1], args.backends[0], "max")
    if not args.no_ao:
        run_ao(model, batches[:1])

    records: dict[tuple, list[dict]] = defaultdict(list)
    for rep in range(args.repeats):
        shift = rep % len(configs)
        for cfg in configs[shift:] + configs[:shift]:
            for attempt in range(args.max_attempts):
                waited = wait_for_quiet(args.quiet_threshold, args.max_wait)
                with timed() as fp32:
                    forward_all(model, batches)
                result = run_ao(model, batches) if cfg[0] == "torch.ao" else \
                    run_fxquant(model, batches, cfg[1], cfg[2])
                foreign = max(fp32["foreign"], result["calibrate"]["foreign"])
                result.update(fp32=fp32, repeat=rep, attempt=attempt, waited_s=waited,
                              clean=foreign < args.quiet_threshold, loadavg=os.getloadavg())
                records[cfg].append(result)
                ratio = result["calibrate"]["wall"] / fp32["wall"]
                print(f"[repeat {rep + 1}/{args.repeats} try {attempt + 1}] {' '.join(cfg)}: fp32 {fp32['wall']:.2f} s,"
                      f" calibrate {result['calibrate']['wall']:.2f} s -> {ratio:.2f}x (other processes: "
                      f"{100 * foreign:.0f}% of the CPUs{'' if result['clean'] else ', not clean'})",
                      file=sys.stderr, flush=True)
                gc.collect()
                if result["clean"]:
                    break

    summary = {cfg: summarize(recs) for cfg, recs in records.items()}
    profiles: dict[tuple, dict] = {}
    if not args.no_profile:
        for cfg in configs:
            wait_for_quiet(args.quiet_threshold, args.max_wait)
            with timed() as fp32:
                forward_all(model, batches)
            profiles[cfg] = profile_ao(model, batches, args.top_ops) if cfg[0] == "torch.ao" else \
                profile_fxquant(model, batches, cfg[1], cfg[2], args.top_ops)
            profiles[cfg]["fp32_s"] = round(fp32["wall"], 4)
            profiles[cfg]["fp32_foreign"] = round(fp32["foreign"], 3)
            print(f"[profile] {' '.join(cfg)}: {profiles[cfg]['split_s']}", file=sys.stderr, flush=True)

    fp32_all = [r["fp32"]["wall"] for recs in records.values() for r in recs if r["clean"]] or \
        [r["fp32"]["wall"] for recs in records.values() for r in recs]
    print(f"\n## Calibration time / fp32 forward time: {args.model}, {args.batches} batches x {args.batch_size}, "
          f"{args.threads} threads, {args.repeats} repeats (paired, rotated)\n")
    print(f"fp32 forward over the {args.batches} batches (clean runs): median {statistics.median(fp32_all):.2f} s "
          f"(min {min(fp32_all):.2f}, max {max(fp32_all):.2f}, n={len(fp32_all)}). A pair is clean when other "
          f"processes used < {100 * args.quiet_threshold:.0f}% of the CPUs during both halves.\n")
    print("| flow | backend | calib method | quantizers | clean/tries | ratio median (min-max) | ratio of minima | "
          "CPU-time ratio | target | prepare s | calibrate s | convert s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for cfg, s in summary.items():
        flow, backend, method = cfg
        if flow == "torch.ao":
            target = "-"
            count = records[cfg][0]["observers"]
        else:
            target = target_for(backend, method)
            count = records[cfg][0]["quantizers"]
        print(f"| {flow} | {backend} | {method} | {count} | {s['n_clean']}/{s['n_attempts']} | "
              f"{s['ratio_median']:.2f}x ({s['ratio_min']:.2f}-{s['ratio_max']:.2f}) | {s['ratio_of_minima']:.2f}x | "
              f"{s['cpu_ratio_median']:.2f}x | {target} | {s['prepare_s_median']:.2f} | "
              f"{s['calibrate_s_median']:.2f} | {s['convert_s_median']:.2f} |")
        if flow == "torch.ao":
            print(f"| torch.ao (forwards only) | {backend} | {method} | {count} | {s['n_clean']}/{s['n_attempts']} | "
                  f"{s['forwards_ratio_median']:.2f}x ({s['forwards_ratio_min']:.2f}-{s['forwards_ratio_max']:.2f}) | "
                  f"- | - | - | - | {s['calibrate_s_median'] - s['calculate_qparams_s_median']:.2f} | - |")
    if profiles:
        print("\n## Where calibration time goes (one instrumented run each; seconds)\n")
        keys = ["total", "forward_and_rest", "collect_activations", "collect_weights", "observe_activations",
                "observe_weights", "compute_ranges", "other_processes_share"]
        print("| flow | backend | method | fp32 s | " + " | ".join(keys) + " | top ops (self CPU s) |")
        print("|---|---|---|---|" + "---|" * len(keys) + "---|")
        for cfg, p in profiles.items():
            ops = p.get("top_ops_second_run") or p.get("top_ops")
            top = ", ".join(f"{o['op'].removeprefix('aten::')} {o['self_cpu_s']:.2f}" for o in ops[:4])
            cells = " | ".join(f"{p['split_s'][k]:.2f}" if k in p["split_s"] else "-" for k in keys)
            print(f"| {cfg[0]} | {cfg[1]} | {cfg[2]} | {p['fp32_s']:.2f} | {cells} | {top} |")

    elapsed = time.perf_counter() - start_all
    print(f"\ntotal run time: {elapsed:.0f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "settings": {"model": args.model, "batches": args.batches, "batch_size": args.batch_size,
                     "threads": args.threads, "repeats": args.repeats, "backends": args.backends,
                     "methods": args.methods, "data": "torch.manual_seed(0); torch.randn(B, 3, 224, 224)",
                     "weights": "random (torchvision default init), eval mode", "targets": TARGETS,
                     "backend_default_calib_method": {b: get_backend(b).activation.calib_method
                                                      for b in args.backends}},
        "environment": {"torch": torch.__version__, "torchvision": torchvision.__version__,
                        "python": platform.python_version(), "cpu_count": os.cpu_count(),
                        "loadavg_at_end": os.getloadavg(), **git_state()},
        "fp32_s": {"median": statistics.median(fp32_all), "min": min(fp32_all), "max": max(fp32_all)},
        "results": [{"flow": cfg[0], "backend": cfg[1], "method": cfg[2], "summary": summary[cfg],
                     "runs": records[cfg], "profile": profiles.get(cfg)} for cfg in configs],
        "run_time_s": elapsed,
    }
    args.out.write_text(json.dumps(payload, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
