"""PTQ passes on real data: fp32 vs per-tensor INT8 with/without cross-layer equalization, bias absorption,
bias correction, and W4A8 round-to-nearest vs AdaRound, on a MobileNet-style digits CNN.

The trained network's channels come out balanced, so per-tensor INT8 already works on it (first rows);
``unbalance_channels`` then rescales BatchNorm channels by 10^U(-1, 1) and compensates in the next layer (the
same function, the inverse of CLE), which is the situation DFQ describes in MobileNets after BN folding.

    python benchmarks/ptq_digits.py [--seeds 0 1 2] [--iterations 1000]

Prints the table and writes its rows to benchmarks/results/ptq_digits.json (rendered into docs/benchmarks.md by
benchmarks/make_docs.py).
"""

from __future__ import annotations

import argparse
import time
import warnings

import _repo  # noqa: F401  (the repo root on sys.path, for tests.models)
import torch
from results_meta import write_results

import fxquant
from fxquant.cli.demo_model import accuracy, load_digits_split
from fxquant.lower.onnx_export import ort_session, run_ort
from tests.models.mobilenet_digits import train_mobilenet_digits, unbalance_channels

W8T = fxquant.QuantSpec(num_bits=8, axis=None, narrow_range=True)
W4C = fxquant.QuantSpec(num_bits=4, axis=0, narrow_range=True)
W4T = fxquant.QuantSpec(num_bits=4, axis=None, narrow_range=True)


def rows(iterations: int) -> list[tuple[str, str, dict | None]]:
    ada = fxquant.AdaRoundOptions(iterations=iterations)
    return [
        ("fp32", "unbalanced", None),
        ("W8A8 per-tensor", "trained (balanced)", dict(weight=W8T)),
        ("W8A8 per-tensor", "unbalanced", dict(weight=W8T)),
        ("W8A8 per-tensor + CLE", "unbalanced", dict(weight=W8T, equalize=True)),
        ("W8A8 per-tensor + CLE + absorption", "unbalanced", dict(weight=W8T, equalize=True, absorb_bias=True)),
        ("W4A8 per-channel + CLE, nearest", "unbalanced", dict(weight=W4C, equalize=True)),
        ("W4A8 per-channel + CLE, AdaRound", "unbalanced", dict(weight=W4C, equalize=True, adaround=ada)),
        ("W4A8 per-channel + CLE, bias corr. (emp.)", "unbalanced", dict(weight=W4C, equalize=True,
                                                                          bias_correction="empirical")),
        ("W4A8 per-tensor + CLE, nearest", "unbalanced", dict(weight=W4T, equalize=True)),
        ("W4A8 per-tensor + CLE, bias corr. (emp.)", "unbalanced", dict(weight=W4T, equalize=True,
                                                                         bias_correction="empirical")),
        ("W4A8 per-tensor + CLE, bias corr. (anal.)", "unbalanced", dict(weight=W4T, equalize=True,
                                                                          bias_correction="analytical")),
        ("W4A8 per-tensor + CLE, AdaRound", "unbalanced", dict(weight=W4T, equalize=True, adaround=ada)),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--iterations", type=int, default=1000, help="AdaRound steps per layer")
    parser.add_argument("--onnx-dir", default="/tmp/fxquant_ptq_digits")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    table = rows(args.iterations)
    results: dict[int, list[tuple[float, float, float | None]]] = {i: [] for i in range(len(table))}
    start = time.perf_counter()
    for seed in args.seeds:
        data = load_digits_split(seed=seed)
        x_train, _, x_test, y_test = data
        trained = train_mobilenet_digits(epochs=6, seed=seed, data=data)
        models = {"trained (balanced)": trained, "unbalanced": unbalance_channels(trained, spread=2.0, seed=seed)}
        batches = [x_train[i:i + 64] for i in range(0, 512, 64)]
        with torch.no_grad():
            refs = {k: m(x_test) for k, m in models.items()}
        for i, (name, which, config) in enumerate(table):
            model = models[which]
            if config is None:
                results[i].append((accuracy(model, x_test, y_test), float("inf"), None))
                continue
            q = fxquant.quantize(model, x_test[:1], batches, config=fxquant.QuantConfig(**config), progress=False)
            ort_acc = None
            if "CLE" in name and ("AdaRound" in name or name.startswith("W8A8 per-tensor + CLE")):
                result = fxquant.export_onnx(q, x_test[:32], f"{args.onnx_dir}/seed{seed}_{i}.onnx")
                session = ort_session(result.path, level="basic")
                ort_acc = accuracy(lambda x, s=session: run_ort(s, (x,))[0], x_test, y_test)
            results[i].append((accuracy(q, x_test, y_test), fxquant.sqnr(refs[which], q(x_test)), ort_acc))
            print(f"  seed {seed}: {name} ({which}): {results[i][-1][0]:.2f}%", flush=True)
    n = len(args.seeds)
    print(f"\nMobileNet-style digits CNN, seeds {args.seeds}, AdaRound {args.iterations} iterations/layer, "
          f"{time.perf_counter() - start:.0f} s\n")
    print("| configuration | model | top-1 % (mean) | per seed | SQNR vs fp32 dB (mean) | ORT top-1 % |")
    print("|---|---|---|---|---|---|")
    out = []
    for i, (name, which, _) in enumerate(table):
        accs = [r[0] for r in results[i]]
        sq = [r[1] for r in results[i]]
        orts = [r[2] for r in results[i] if r[2] is not None]
        sq_text = "-" if sq[0] == float("inf") else f"{sum(sq) / n:.1f}"
        ort_text = f"{sum(orts) / len(orts):.2f}" if orts else ""
        print(f"| {name} | {which} | {sum(accs) / n:.2f} | {' / '.join(f'{a:.2f}' for a in accs)} | {sq_text} | "
              f"{ort_text} |")
        out.append({"configuration": name, "model": which, "top1_per_seed": accs,
                    "sqnr_db_per_seed": [None if q == float("inf") else q for q in sq], "ort_top1_per_seed": orts})
    settings = {"seeds": args.seeds, "adaround_iterations": args.iterations, "threads": 1, "epochs": 6,
                "calib_batches": 8, "batch_size": 64, "seconds": round(time.perf_counter() - start)}
    print(f"wrote {write_results('ptq_digits', out, settings)}")


if __name__ == "__main__":
    main()
