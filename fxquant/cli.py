"""Command line: ``fxquant demo`` (also ``python -m fxquant demo``)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fxquant", description="torch.fx quantization to QDQ ONNX for "
                                     "TensorRT and ONNX Runtime")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train the digits CNN, quantize it for both backends, compare fp32 and int8")
    demo.add_argument("--out", default="fxquant_out", help="folder for the ONNX files (default: fxquant_out)")
    demo.add_argument("--seed", type=int, default=0, help="training and data-split seed (default: 0)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from fxquant.demo import run_demo

        run_demo(out_dir=args.out, seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
