"""``fxquant report MODEL --calib ... --out report.html``: per-layer sensitivity as HTML with a plot."""

from __future__ import annotations

import argparse
import os

import fxquant
from fxquant.analysis.sensitivity import sensitivity
from fxquant.analysis.sensitivity_report import NO_MATPLOTLIB, plot_png
from fxquant.cli.inputs import CLIError, add_model_and_data_args, load_model_and_data
from fxquant.cli.summary import Stopwatch, config_from_args, print_table, quiet_warnings
from fxquant.files import atomic_write, output_path

DESCRIPTION = """Sensitivity report: prepare and calibrate MODEL, then for every quantized layer measure the
SQNR (dB, against the float model) of the model output and of the layer's own output with only that layer
quantized and with every layer up to it quantized. Writes a self-contained HTML file (plot embedded as PNG when
matplotlib is installed: pip install 'fxquant[report]') and prints the most harmful layers."""

EPILOG = """examples:
  fxquant report resnet18 --calib random --out resnet18_sensitivity.html
  fxquant report my_models.py:build --backend onnxruntime --calib calib.npy --top 5 --png sensitivity.png"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("report", help="per-layer sensitivity report (HTML with plots)", description=DESCRIPTION,
                            epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_and_data_args(parser)
    parser.add_argument("--eval-batches", type=int, default=2, metavar="N",
                        help="how many of the calibration batches the sensitivity runs use (default: 2; each "
                             "layer costs two forward passes over them)")
    parser.add_argument("--out", default=None, metavar="PATH",
                        help="HTML file to write (default: <model>_<backend>_sensitivity.html)")
    parser.add_argument("--png", default=None, metavar="PATH", help="also save the plot as a PNG file")
    parser.add_argument("--top", type=int, default=10, metavar="N", help="layers to list on the console (default: 10)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.eval_batches < 1:
        raise CLIError(f"--eval-batches must be at least 1, got {args.eval_batches}")
    if args.top < 1:
        raise CLIError(f"--top must be at least 1 (the number of layers to list), got {args.top}")
    clock = Stopwatch()
    model, name, batches, data_note = load_model_and_data(args, clock)
    out = output_path(args.out or f"{name}_{args.backend}_sensitivity.html", "report", CLIError)
    if args.png:
        output_path(args.png, "PNG", CLIError)  # before the work, not after it
    with quiet_warnings() as notes:
        with clock("prepare"):
            prepared = fxquant.prepare(model, batches[0], backend=args.backend, config=config_from_args(args))
        with clock("calibrate"):
            fxquant.calibrate(prepared, batches)
        with clock("sensitivity"):
            report = sensitivity(prepared, batches[:args.eval_batches])
    with clock("write"):
        report.write_html(out, title=f"fxquant sensitivity: {name} ({args.backend})")
        if args.png:
            png = plot_png(report)
            if png is None:
                notes.append(f"--png skipped: {NO_MATPLOTLIB}")
            else:
                with atomic_write(args.png) as tmp, open(tmp, "wb") as f:
                    f.write(png)
    print("\n" + report.table(limit=args.top))
    worst = ", ".join(f"{s.name} ({s.model_only_db:.1f} dB)" for s in report.ranked()[:3])
    rows = [("model", args.model), ("backend", args.backend), ("calibration", data_note),
            ("layers analysed", f"{len(report.layers)} on {report.num_batches} batch(es)"),
            ("all quantized", f"{report.full_db:.1f} dB SQNR at the model output"),
            ("most harmful", worst),
            ("time", clock.summary()),
            ("written", os.path.abspath(out) + (f" and {os.path.abspath(args.png)}" if args.png and
                                                  os.path.exists(args.png) else ""))]
    print_table("fxquant report", rows, notes + report.notes)
    return 0
