"""Markdown tables of the benchmark results files, one renderer per file (benchmarks/results/<name>.json).

Used by make_docs.py to write docs/benchmarks.md, and by the benchmark scripts that print their own table, so the
printed table and the documented one are the same. Standard library only: rendering needs no torch.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Section:
    """How one results file becomes a section of docs/benchmarks.md."""

    title: str
    command: str  # used when the file does not record its own command
    about: str  # what was measured, how (one paragraph)
    render: Callable[[dict], str]


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "-"


def _db(value: float | None) -> str:
    return "inf" if value is None or math.isinf(value) else f"{value:.1f}"


def sqnr_torchvision(data: dict) -> str:
    lines = ["| model | backend | int8 vs fp32 (dB) | ORT vs fake-quant (dB) | Q / DQ nodes | "
             "prepare+calibrate+convert s | export s |", "|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        lines.append(f"| {r['model']} | {r['backend']} | {_db(r['int8_vs_fp32_db'])} | "
                     f"{_db(r['ort_vs_fakequant_db'])} | {r['quantize_linear']} / {r['dequantize_linear']} | "
                     f"{r['compile_s']:.1f} | {r['export_s']:.1f} |")
    return "\n".join(lines)


def ort_resnet18(data: dict) -> str:
    return data["markdown"]  # bench_ort_resnet18.py stores its table and notes beside the measurements


def zoo(results: dict) -> str:
    """The zoo table (zoo_torchvision.py prints the same), models in the order of the results file."""
    lines = ["| model | backend | input | int8 vs fp32 dB | ORT vs fake-quant dB | Q / DQ | float ops (report) | "
             "float compute ops in ORT graph | export s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, per_backend in results.items():
        for backend, r in per_backend.items():
            ort = "n/a" if backend == "tensorrt" else _counts(r.get("ort_float_ops", {}))
            lines.append(f"| {name} | {backend} | {r['input'][-1]} | {r['int8_vs_fp32_db']:.1f} | "
                         f"{r['ort_vs_fakequant_db']:.1f} | {r['quantize_linear']} / {r['dequantize_linear']} | "
                         f"{_counts(r['report_float_ops'])} | {ort} | {r['export_s']:.0f} |")
    return "\n".join(lines)


def untraceable_row(r: dict) -> str:
    def code(names: list[str]) -> str:
        return ", ".join(f"`{n}`" for n in names)

    return (f"| {r['model']} | {r['backend']} | {code(r['traced'])} | {code(r['eager'])} | "
            f"{r['quantized']} / {r['weighted']} | {_db(r['int8_vs_fp32_db'])} | {_db(r['ort_vs_fakequant_db'])} | "
            f"{r['compile_s']:.1f} |")


UNTRACEABLE_HEADER = ("| model | backend | traced parts | eager modules | Linear/Conv quantized | int8 vs fp32 (dB) | "
                      "ORT vs fake-quant (dB) | prepare+calibrate+convert s |\n|---|---|---|---|---|---|---|---|")


def untraceable_models(data: dict) -> str:
    return "\n".join([UNTRACEABLE_HEADER, *(untraceable_row(r) for r in data["rows"])])


def calib_accuracy(data: dict) -> str:
    columns = [(b, p) for b in data["verdict"] for p in data["settings"]["precisions"]]
    backends = list(data["verdict"])
    mean = {(r["backend"], r["precision"], r["method"]): r["mean"] for r in data["results"]}
    avg = {(r["backend"], r["method"]): r["mean"] for r in data["avg_over_precisions"]}
    lines = [f"| method | {' | '.join(f'{b} {p}' for b, p in columns)} | "
             f"{' | '.join(f'{b} avg' for b in backends)} |", "|---|" + "---|" * (len(columns) + len(backends)),
             "| fp32 | " + " | ".join([f"{data['fp32']['mean']:.2f}"] * (len(columns) + len(backends))) + " |"]
    for method in data["settings"]["methods"]:
        cells = [mean[(b, p, method)] for b, p in columns] + [avg[(b, method)] for b in backends]
        lines.append(f"| {method} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
    return "\n".join(lines)


def calibration_speed(data: dict) -> str:
    settings = data["settings"]
    defaults, targets = settings["backend_default_calib_method"], settings["targets"]
    lines = ["| flow | backend | calib method | quantizers | ratio median (min-max) | target | prepare s | "
             "calibrate s | convert s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in data["results"]:
        s, flow, backend, method = r["summary"], r["flow"], r["backend"], r["method"]
        count = r["runs"][0]["observers" if flow == "torch.ao" else "quantizers"]
        target = "-"
        if flow == "fxquant" and method == defaults.get(backend):
            method, target = f"{method} (default)", f"<= {targets['default']}"
        elif flow == "fxquant" and method in ("percentile", "entropy", "mse"):
            target = f"<= {targets['histogram']}"
        lines.append(f"| {flow} | {backend} | {method} | {count} | {s['ratio_median']:.2f}x "
                     f"({s['ratio_min']:.2f}-{s['ratio_max']:.2f}) | {target} | {s['prepare_s_median']:.2f} | "
                     f"{s['calibrate_s_median']:.2f} | {s['convert_s_median']:.2f} |")
        if flow == "torch.ao":
            lines.append(f"| torch.ao (forwards only) | {backend} | {method} | {count} | "
                         f"{s['forwards_ratio_median']:.2f}x ({s['forwards_ratio_min']:.2f}-"
                         f"{s['forwards_ratio_max']:.2f}) | - | - | "
                         f"{s['calibrate_s_median'] - s['calculate_qparams_s_median']:.2f} | - |")
    return "\n".join(lines)


def ptq_digits(data: dict) -> str:
    lines = ["| configuration | model | top-1 % (mean) | per seed | SQNR vs fp32 dB (mean) | ORT top-1 % |",
             "|---|---|---|---|---|---|"]
    for r in data["rows"]:
        accs, sq, orts = r["top1_per_seed"], r["sqnr_db_per_seed"], r["ort_top1_per_seed"]
        sq_text = "-" if None in sq else f"{statistics.fmean(sq):.1f}"
        ort_text = f"{statistics.fmean(orts):.2f}" if orts else ""
        lines.append(f"| {r['configuration']} | {r['model']} | {statistics.fmean(accs):.2f} | "
                     f"{' / '.join(f'{a:.2f}' for a in accs)} | {sq_text} | {ort_text} |")
    return "\n".join(lines)


def qat_digits(flows: dict) -> str:
    seeds = [r["seed"] for r in next(iter(flows.values()))]
    lines = [f"| flow | {' | '.join(f'seed {s} PTQ -> QAT' for s in seeds)} | mean QAT | min QAT |",
             f"|---|{'---|' * len(seeds)}---|---|"]
    for name, runs in flows.items():
        cells = " | ".join(f"{'-' if math.isnan(r['ptq']) else format(r['ptq'], '.2f')} -> {r['qat']:.2f}"
                           for r in runs)
        qats = [r["qat"] for r in runs]
        lines.append(f"| {name} | {cells} | {statistics.mean(qats):.2f} | {min(qats):.2f} |")
    fp32 = ", ".join(f"{r['fp32']:.2f}" for r in next(iter(flows.values())))
    return "\n".join([*lines, "", f"Float accuracy per seed: {fp32}."])


def compiler_speed(out: dict) -> str:
    """The compiler-speed table (bench_compiler.py prints the same)."""
    lines = ["| model | graph nodes | fxquant s | torch.ao s | fxquant / torch.ao | fp32 forward s |",
             "|---|---|---|---|---|---|"]
    for name, r in [*out["models"].items(), *((f"residual stack N={d}", r) for d, r in out["growth"].items())]:
        lines.append(f"| {name} | {r['traced_nodes']} | {r['fxquant_s']:.3f} | {r['torch_ao_s']:.3f} | "
                     f"{r['ratio_fxquant_over_torch_ao']:.2f} | {r['fp32_forward_s']:.3f} |")
    for tool in ("fxquant", "torch_ao"):
        f = out[f"{tool}_fit"]
        lines.append(f"\n{tool}: {1000 * f['seconds_per_node']:.3f} ms per node (R^2 = {f['r2']:.4f}); ms/node at "
                     f"each depth: {f['ms_per_node_each_size']}")
    return "\n".join(lines)


def transformer_minilm(data: dict) -> str:
    lines = ["| sequence | recipe | cosine to fp32 (mean / min) | ORT latency ms | speed-up vs fp32 "
             "| export ORT check dB |",
             "|---|---|---|---|---|---|"]
    for length, recipes in data["lengths"].items():
        for name, r in recipes.items():
            check, ms, up = r.get("export_ort_check_db"), r.get("latency_ms"), r.get("speedup")
            lines.append(f"| {length} | {name} | {r['cos_mean']:.3f} / {r['cos_min']:.3f} | "
                         f"{'-' if ms is None else f'{ms:.1f}'} | {'-' if up is None else f'{up:.2f}x'} | "
                         f"{'' if check is None else _db(check)} |")
    return "\n".join(lines)


def _table(columns: list[str], rows: list[list[object]]) -> str:
    """A markdown table: a header of ``columns``, then one row per list of cells."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def exact_models(data: dict) -> str:
    """The convert(exact=...) table: differing outputs on new inputs, ORT vs fake-quant before and exact after."""
    return _table(["model", "preset", "target", "differing outputs (new inputs)", "export check differing",
                   "ORT vs fake-quant dB (before)", "ORT vs exact dB (after)", "first mismatch"],
                  [[r["model"], r["backend"], r["target"], f"{r['differing']} of {r['outputs']}",
                    r["export_check_differing"], _db(r["ort_vs_fakequant_db"]), _db(r["ort_vs_exact_db"]),
                    r["first_mismatch"] or "-"] for r in data["rows"]])


def hist_subsample(data: dict) -> str:
    """Histogram subsample (2^20 elements per tensor and batch) against binning every element."""
    rows = [(name, row["subsample"], row["all"], row["ranges"]) for name, row in data.items() if isinstance(row, dict)]
    return _table(["model / preset", "ranges identical", "largest range difference (of its width)",
                   "SQNR dB subsample / all", "top-1 agreement subsample / all", "calibrate s subsample / all"],
                  [[name, f"{r['identical']} of {r['quantizers']}", f"{r['max_rel_diff']:.2%}",
                    f"{sub['sqnr_db']:.2f} / {every['sqnr_db']:.2f}",
                    f"{sub['top1_agreement']:.1%} / {every['top1_agreement']:.1%}",
                    f"{sub['calibrate_s']:.0f} / {every['calibrate_s']:.0f}"] for name, sub, every, r in rows])


def skip_layernorm(data: dict) -> str:
    """SkipLayerNormalization against Add + LayerNormalization, per sequence length and width."""
    return _table(["tokens", "width", "SkipLayerNormalization ms", "Add + LayerNormalization ms", "ratio"],
                  [[r["length"], r["width"], r["skiplayernorm_ms"], r["add_layernorm_ms"], f"{r['ratio']}x"]
                   for r in data["rows"]])
