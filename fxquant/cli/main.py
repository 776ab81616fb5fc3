"""Command line: ``fxquant quantize | report | demo`` (also ``python -m fxquant ...``).

This module only builds the parser and dispatches; each subcommand lives in ``fxquant.cli`` (or
``fxquant.cli.demo``). Errors print one line on stderr and exit with code 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from fxquant.cli import quantize_cmd, report_cmd
from fxquant.errors import FxQuantError
from fxquant.version import __version__

EPILOG = """run 'fxquant COMMAND --help' for a command's options. Errors print one line and exit with code 2
(FXQUANT_TRACEBACK=1 shows the traceback). MODEL or DATA given as file.py:function executes that file."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: 'fxquant quantize: error: ... (see --help)'."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see: {self.prog} --help)\n")


def _demo(args: argparse.Namespace) -> int:
    try:  # lazy: the demo needs the optional scikit-learn, which the other commands must not require
        from fxquant.cli.demo import run_demo
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] != "sklearn":
            raise
        raise ImportError('the demo needs scikit-learn (its digits data): pip install "fxquant[demo]"') from exc

    run_demo(out_dir=args.out, seed=args.seed)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fxquant", description="torch.fx quantization to QDQ ONNX for TensorRT and ONNX Runtime",
                     epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"fxquant {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    quantize_cmd.add_parser(sub)
    report_cmd.add_parser(sub)
    demo = sub.add_parser("demo", help="train the digits CNN, quantize it for both backends, compare fp32 and int8",
                          description="Train a residual depthwise-separable CNN on scikit-learn's digits (real data "
                                      "that ships offline), quantize it for both backends and print fp32 vs int8 "
                                      "accuracy and latency in torch and ONNX Runtime.")
    demo.add_argument("--out", default="fxquant_out", help="folder for the ONNX files (default: fxquant_out)")
    demo.add_argument("--seed", type=int, default=0, help="training and data-split seed (default: 0)")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except Exception as exc:  # every error is one line (FXQUANT_TRACEBACK=1 shows the traceback)
        if os.environ.get("FXQUANT_TRACEBACK"):
            raise
        message = " ".join(str(exc).split()) or type(exc).__name__
        if not isinstance(exc, (FxQuantError, ValueError, TypeError, OSError, ImportError)):
            message = f"{type(exc).__name__}: {message} (set FXQUANT_TRACEBACK=1 to see where)"
        print(f"fxquant {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
