"""Models torch.fx cannot trace whole, quantized unedited: what ran eagerly, what was quantized, how well.

    python benchmarks/untraceable_models.py

For the BERT-style encoder and the YOLO-style detector of ``tests.models.untraceable`` (random weights,
randomized BatchNorm statistics), with both backends: the parts traced as graphs, the modules that ran
eagerly, Linear/Conv layers quantized (of all), the int8 model against fp32 (the encoder's last hidden state;
the detector's scores) and ONNX Runtime against the fake-quant model on all outputs (dB). Prints the table and
writes its rows to benchmarks/results/untraceable_models.json (rendered into docs/benchmarks.md by make_docs.py).
"""

from __future__ import annotations

import tempfile
import time
import warnings
from pathlib import Path

import _repo  # noqa: F401  (the repo root on sys.path, for tests.models)
import torch
from doc_tables import UNTRACEABLE_HEADER, untraceable_row
from results_meta import write_results
from torch import nn

import fxquant
from fxquant.report import OpEntry
from tests.models.untraceable import BertStyleModel, Detector, bert_inputs, randomize_bn


def _first(out: object) -> torch.Tensor:
    """The encoder's last hidden state; the detector's objectness and class scores (its decoded box centres
    are dominated by the grid offsets, which quantization does not touch)."""
    return out[..., 4:] if isinstance(out, torch.Tensor) else out.last_hidden_state


def _weighted(model: nn.Module) -> int:
    return sum(1 for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))


def run(name: str, model: nn.Module, example: tuple, batches: list, backend: str, out: Path) -> dict:
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = fxquant.prepare(model, example, backend=backend)
        fxquant.calibrate(prepared, batches, progress=False)
        qmodel = fxquant.convert(prepared)
        seconds = time.perf_counter() - start
        result = fxquant.export_onnx(qmodel, example, out / f"{name}_{backend}.onnx")
    report = fxquant.report_of(prepared)
    quantized = sum(1 for m in prepared.modules() if isinstance(m, (nn.Linear, nn.Conv2d))
                    and hasattr(m, "weight_quantizer"))
    with torch.no_grad():
        db = fxquant.sqnr(_first(model(*example)), _first(qmodel(*example)))

    def names(entries: list[OpEntry] | list[str]) -> list[str]:
        return [getattr(e, "node", e) or "<root>" for e in entries]

    return {"model": name, "backend": backend, "traced": names(report.traced), "eager": names(report.eager),
            "quantized": quantized, "weighted": _weighted(model), "int8_vs_fp32_db": db,
            "ort_vs_fakequant_db": result.ort_sqnr_db, "compile_s": seconds}


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    bert = BertStyleModel().eval()
    detector = randomize_bn(Detector())
    g = torch.Generator().manual_seed(0)
    images = [torch.randn(2, 3, 64, 64, generator=g) for _ in range(4)]
    print(UNTRACEABLE_HEADER)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for backend in ("tensorrt", "onnxruntime"):
            rows.append(run("bert_style", bert, bert_inputs(), [bert_inputs(seed=s) for s in range(1, 5)], backend,
                            Path(tmp)))
            print(untraceable_row(rows[-1]), flush=True)
            rows.append(run("yolo_style", detector, (images[0],), images, backend, Path(tmp)))
            print(untraceable_row(rows[-1]), flush=True)
    print(f"wrote {write_results('untraceable_models', rows, {'threads': 1, 'calib_batches': 4})}")


if __name__ == "__main__":
    main()
