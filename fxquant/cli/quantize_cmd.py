"""``fxquant quantize MODEL --backend ... --calib ... --out model.onnx``: prepare, calibrate, convert, export."""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from collections import Counter

import torch

import fxquant
from fxquant.analysis.tune import check_tunable
from fxquant.cli.inputs import add_model_and_data_args, load_model_and_data
from fxquant.cli.summary import Stopwatch, config_from_args, print_table, quiet_warnings
from fxquant.lower.onnx_export import DEFAULT_OPSET, export_float_onnx
from fxquant.lower.outputs import flat_outputs
from fxquant.spec import CALIB_METHODS, CPU_TARGETS
from fxquant.validate.export import check_opset, export_path

DESCRIPTION = """Targets a model to QDQ ONNX: trace it, fold BatchNorm, place quantizers for the backend,
calibrate on DATA, convert, export, check the ONNX model with onnx.checker and run it in ONNX Runtime against
the fake-quant model. Prints a summary table at the end."""

EPILOG = """examples:
  fxquant quantize resnet18 --backend tensorrt --calib random --out resnet18_trt.onnx
  fxquant quantize mobilenet_v2 --backend onnxruntime --calib ~/imagenet/val --num-batches 16 --out mnv2.onnx
  fxquant quantize my_models.py:build --calib calib.pt --exclude 'head.*' --out model.onnx"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("quantize", help="quantize a model and export QDQ ONNX", description=DESCRIPTION,
                            epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_and_data_args(parser)
    parser.add_argument("--calib-method", choices=CALIB_METHODS, default=None,
                        help="activation calibration method (default: the backend's)")
    parser.add_argument("--target", choices=list(CPU_TARGETS), default=None,
                        help="ONNX Runtime backends: the CPU the model will run on, which decides the weight widths "
                             "(vnni: plain 8-bit; avx2 or none given: saturation-safe on both; docs/deploy-exact.md)")
    parser.add_argument("--out", default=None, metavar="PATH",
                        help="ONNX file to write (default: <model>_<backend>.onnx)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                        help=f"ONNX opset to write (default: {DEFAULT_OPSET}); a lower one as far as ONNX's version "
                             "converter can write the model's ops (14 for most CNNs, 17 with LayerNorm), checked "
                             "before calibration")
    parser.add_argument("--tune", action="store_true",
                        help="onnxruntime backend: time the model in ONNX Runtime on the first calibration batch and "
                             "leave float the layers where int8 is slower, so the ONNX is never slower than float")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.tune:  # before calibrating: the backend decides whether tune can run
        check_tunable(fxquant.BACKENDS[args.backend])
    clock = Stopwatch()
    check_opset(args.opset)
    model, name, batches, data_note = load_model_and_data(args, clock)
    example = batches[0]
    if args.opset != DEFAULT_OPSET:  # the float model's ops decide the opsets it can be written at: say so now
        with clock("opset check"), quiet_warnings(), tempfile.TemporaryDirectory() as tmp:
            export_float_onnx(model, example, os.path.join(tmp, "float.onnx"), opset=args.opset)
    config = config_from_args(args)
    out = export_path(args.out or f"{name}_{args.backend}.onnx")  # a directory raises now, not after calibration
    with quiet_warnings() as notes:
        with clock("prepare"):
            prepared = fxquant.prepare(model, example, backend=args.backend, config=config)
        with clock("calibrate"):
            fxquant.calibrate(prepared, batches)
        with clock("convert"):
            qmodel = fxquant.convert(prepared)
        tuned = None
        if args.tune:
            with clock("tune"):
                tuned = fxquant.tune(qmodel, example)
            qmodel = tuned.model
        with clock("export + verify"):
            result = fxquant.export_onnx(qmodel, example, out, opset=args.opset)
    with torch.no_grad():  # every output of the model (a tuple, a dict): the worst one
        int8_db = min(fxquant.sqnr(f, q) for (_, f), (_, q) in
                      zip(flat_outputs(model(example)), flat_outputs(qmodel(example)), strict=True))
    report = fxquant.report_of(qmodel).as_dict()
    ops = Counter(n.op_type for n in result.model.graph.node)
    rows = [
        ("model", f"{args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters)"),
        ("backend", args.backend),
        ("calibration", data_note),
        ("ops quantized / float", f"{len(report['quantized'])} / {len(report['float'])}"
         + (f" ({', '.join(e['node'] for e in report['float'][:4])}{' ...' if len(report['float']) > 4 else ''})"
            if report["float"] else "")),
        ("quantizers", f"{report['activation_quantizers']} activation + {report['weight_quantizers']} weight"),
        ("BatchNorm folded", str(len(report["folded_bn"]))),
        ("ONNX Q / DQ nodes", f"{ops['QuantizeLinear']} / {ops['DequantizeLinear']} (of {sum(ops.values())})"),
        ("fake-quant vs fp32", f"{int8_db:.1f} dB SQNR on the first calibration batch"),
        ("ONNX Runtime vs fake-quant", "identical outputs (bit for bit)" if math.isinf(result.ort_sqnr_db)
         else f"{result.ort_sqnr_db:.1f} dB SQNR"),
        *([("tune", tuned.summary().splitlines()[0].removeprefix("tune: "))] if tuned else []),
        ("time", clock.summary()),
        ("written", f"{os.path.abspath(out)} ({os.path.getsize(out) / 1e6:.2f} MB)"),
    ]
    print_table("fxquant quantize", rows, notes)
    return 0
