"""Property-based fuzzing of the whole pipeline on random small graphs (issue 13, section 3).

For every generated model (tests/fuzz_graphs.py) and both backends: prepare -> calibrate -> convert ->
export_onnx either works or raises an FxQuantError that names an op of the model; ONNX Runtime agrees with the
fake-quant model (``ExportResult.ort_sqnr_db >= 30`` dB, or one of ``ACCEPTED_LOW_AGREEMENT``); the user's
model is unchanged (state_dict, parameters, buffers, mode and forward output bit-identical) and so is the
example input; the prepare report accounts for every op of the traced model (quantized, pass-through, float
with a reason, or folded); the prepared model with its quantizers disabled computes the float function
(>= 80 dB: BatchNorm folding and rewrites change nothing but float rounding).

A second property: prepared from a batch-1 example and calibrated on padded batches (trailing positions of each
sequence zeroed, as users calibrate), the converted model runs at batch 1 and 4 and, for sequences, at other
lengths: each sample gives what it gives alone, the result tracks the float model about as closely as at the
example's shape, and ONNX Runtime (exported at batch 1) agrees at batch 4.

The default run is short and deterministic (derandomized, no example database). The long runs are marked
``fuzz`` and excluded by default: ``FXQUANT_FUZZ_EXAMPLES=500 pytest -m fuzz tests/test_fuzz.py`` (random
seeds; hypothesis prints a ``@reproduce_failure`` line to replay a failure).
"""

from __future__ import annotations

import copy
import os
import tempfile
import warnings
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import fx

import fxquant
from fxquant.lower.onnx_export import ort_session, run_ort
from fxquant.report import PrepareReport
from tests.float_twin import float_twin
from tests.fuzz_graphs import FuzzModel, Program
from tests.fuzz_ops import programs

BACKENDS = ("tensorrt", "onnxruntime")
MIN_AGREEMENT_DB = 30.0
_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
DEFAULT = settings(max_examples=6, deadline=None, derandomize=True, database=None, suppress_health_check=_HEALTH,
                   print_blob=True)
SHAPES = settings(max_examples=4, deadline=None, derandomize=True, database=None, suppress_health_check=_HEALTH,
                  print_blob=True)
LONG = settings(max_examples=int(os.environ.get("FXQUANT_FUZZ_EXAMPLES", "300")), deadline=None, database=None,
                suppress_health_check=_HEALTH, print_blob=True)


# ---- what a run must leave untouched ------------------------------------------------------------------------
@dataclass
class Snapshot:
    state: dict[str, torch.Tensor]
    params: list[tuple[str, torch.Tensor, bool]]
    training: bool
    output: tuple[torch.Tensor, ...]


def _outputs(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        out = model(x.clone())
    return out if isinstance(out, tuple) else (out,)


def snapshot(model: torch.nn.Module, x: torch.Tensor) -> Snapshot:
    return Snapshot({k: v.detach().clone() for k, v in model.state_dict().items()},
                    [(k, p.detach().clone(), p.requires_grad) for k, p in model.named_parameters()],
                    model.training, _outputs(model, x))


def assert_unchanged(model: torch.nn.Module, before: Snapshot, x: torch.Tensor) -> None:
    state = model.state_dict()
    assert state.keys() == before.state.keys(), "the user's model gained or lost state_dict entries"
    for k, v in before.state.items():
        assert torch.equal(state[k], v), f"the user's model's `{k}` changed"
    params = [(k, p.detach(), p.requires_grad) for k, p in model.named_parameters()]
    assert [(k, g) for k, _, g in params] == [(k, g) for k, _, g in before.params]
    assert all(torch.equal(p, q) for (_, p, _), (_, q, _) in zip(params, before.params, strict=True))
    assert model.training == before.training
    after = _outputs(model, x)
    assert all(torch.equal(a, b) for a, b in zip(after, before.output, strict=True)), "the model's output changed"


# ---- the prepare report ---------------------------------------------------------------------------------------
def traced_ops(model: torch.nn.Module) -> set[str]:
    """Names of the op nodes of the user's model as torch.fx traces it (before any fxquant pass)."""
    gm = fx.symbolic_trace(copy.deepcopy(model))
    return {n.name for n in gm.graph.nodes if n.op in ("call_module", "call_function", "call_method")}


def assert_report_accounts(report: PrepareReport, ops: set[str], backend: str) -> None:
    entries = [*report.quantized, *report.passthrough, *report.float_ops]
    reported = [e.node for e in entries] + [bn.replace(".", "_") for bn in report.folded_bn]
    assert len(reported) == len(set(reported)), f"an op is reported twice: {sorted(reported)}"
    assert set(reported) == ops, (f"report and graph differ: missing {sorted(ops - set(reported))}, "
                                  f"unknown {sorted(set(reported) - ops)}")
    for e in report.float_ops:  # every op the generator makes is known: it stays float for a stated reason
        assert e.detail and f"no {backend} rule knows" not in e.detail, f"`{e.node}` ({e.kind}) float: {e.detail}"


# ---- float semantics of the graph passes ----------------------------------------------------------------------
MIN_FLOAT_EQUIVALENCE_DB = 80.0  # float32 rounding of folded BatchNorms: typically > 120 dB


def float_equivalence_db(prepared: torch.nn.Module, x: torch.Tensor, reference: tuple[torch.Tensor, ...]) -> float:
    """SQNR of the prepared model with every quantizer disabled against the user's model: what the passes
    (BatchNorm folding, rewrites) did to the float function."""
    twin = float_twin(prepared)
    return min(fxquant.sqnr(r, o) for r, o in zip(reference, _outputs(twin, x), strict=True))


# ---- ORT agreement ---------------------------------------------------------------------------------------------
# The only reasons ORT may agree with the fake-quant model at less than MIN_AGREEMENT_DB (each asserted below):
ACCEPTED_LOW_AGREEMENT = {
    "zero output": "an output of the fake-quant model is exactly zero, so its SQNR is undefined (-inf)",
    "within quantization noise": ("ORT's difference from the fake-quant model is no larger than the fake-quant "
                                  "model's own difference from the float model: torch and ORT round floats "
                                  "differently and a quantizer turns each difference into a whole-step flip, so "
                                  "agreement cannot beat the model's own quantization noise (export_onnx warns so)"),
}


def low_agreement_reason(float_out: tuple[torch.Tensor, ...], qmodel: torch.nn.Module, x: torch.Tensor,
                         ort_db: float) -> str | None:
    """The ACCEPTED_LOW_AGREEMENT key that explains an agreement below MIN_AGREEMENT_DB, or None."""
    fake = _outputs(qmodel, x)
    if any(not o.any() for o in fake):
        return "zero output"
    own_db = min(fxquant.sqnr(f, q) for f, q in zip(float_out, fake, strict=True))
    return "within quantization noise" if ort_db >= own_db else None


# ---- one example ----------------------------------------------------------------------------------------------
def op_names(model: torch.nn.Module, program: Program) -> set[str]:
    """What an error message may call an op of this model: node and module names, op kinds."""
    names = traced_ops(model) | {f"mods.{m}" for m in program.modules} | {s.op for s in program.steps}
    return names | {n.replace("_", ".", 1) for n in names}


def run_backend(model: torch.nn.Module, program: Program, backend: str, workdir: str) -> float | None:
    """Run the pipeline on ``model`` and assert the properties; returns ORT's agreement in dB (None: an error)."""
    gen = torch.Generator().manual_seed(len(program.steps))
    x = torch.randn(program.input_shape, generator=gen)
    batches = [torch.randn(program.input_shape, generator=gen) for _ in range(3)]
    before, x_before = snapshot(model, x), x.clone()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # float ops and low agreement warn; both are asserted below
            prepared = fxquant.prepare(model, x, backend=backend)
            fxquant.calibrate(prepared, [x, *batches], progress=False)
            qmodel = fxquant.convert(prepared)
            result = fxquant.export_onnx(qmodel, x, os.path.join(workdir, f"{backend}.onnx"))
    except fxquant.FxQuantError as exc:
        names = op_names(model, program)
        assert any(n in str(exc) for n in names), f"{type(exc).__name__} names no op of the model: {exc}"
        return None
    finally:
        assert_unchanged(model, before, x)
        assert torch.equal(x, x_before), "the example input changed"
    assert_report_accounts(fxquant.report_of(prepared), traced_ops(model), backend)
    float_db = float_equivalence_db(prepared, x, before.output)
    assert float_db >= MIN_FLOAT_EQUIVALENCE_DB, f"prepare changed the float function: {float_db:.1f} dB"
    if not result.ort_sqnr_db >= MIN_AGREEMENT_DB:
        reason = low_agreement_reason(before.output, qmodel, x, result.ort_sqnr_db)
        assert reason in ACCEPTED_LOW_AGREEMENT, f"ORT agrees with the fake-quant model at {result.ort_sqnr_db:.1f} dB"
    return result.ort_sqnr_db


def check_program(program: Program) -> None:
    model = FuzzModel(program).eval()
    with tempfile.TemporaryDirectory() as workdir:
        for backend in BACKENDS:
            run_backend(model, program, backend, workdir)


# ---- other batches, other lengths, padded calibration ----------------------------------------------------------
MIN_BATCH_AGREEMENT_DB = 30.0  # a sample quantized alone vs in a batch of 4: only float-rounding flips differ


def _padded(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A sequence batch as users calibrate on it: each sample's trailing positions zero-padded (images as given)."""
    if x.dim() != 3:
        return x
    x = x.clone()
    for row in range(x.shape[0]):
        keep = int(torch.randint(1, x.shape[1] + 1, (1,), generator=gen))
        x[row, keep:] = 0
    return x


def _other_shapes(shape: tuple[int, ...], gen: torch.Generator) -> list[torch.Tensor]:
    """Inputs at batch 1 and 4 and, for sequences, at two other lengths."""
    shapes = [(1, *shape[1:]), (4, *shape[1:])]
    if len(shape) == 3:
        shapes += [(4, shape[1] - 2, shape[2]), (1, shape[1] + 3, shape[2])]
    return [torch.randn(s, generator=gen) for s in shapes]


def check_shapes(program: Program, backend: str) -> None:
    """Prepared from a batch-1 example and calibrated on padded batches of 3, the converted model runs at every
    batch and length the float model runs at: each sample gives what it gives alone (batch independence), the
    result tracks the float model as closely as at the example's shape, and ONNX Runtime agrees at batch 4."""
    with tempfile.TemporaryDirectory() as workdir:
        _check_shapes(program, backend, workdir)


def _check_shapes(program: Program, backend: str, workdir: str) -> None:
    model = FuzzModel(program).eval()
    gen = torch.Generator().manual_seed(len(program.steps) + 7)
    one = torch.randn((1, *program.input_shape[1:]), generator=gen)
    batches = [_padded(torch.randn((3, *program.input_shape[1:]), generator=gen), gen) for _ in range(3)]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qmodel = fxquant.quantize(model, one, [one, *batches], backend=backend, progress=False)
            result = fxquant.export_onnx(qmodel, one, os.path.join(workdir, f"{backend}_b1.onnx"), verify=False)
    except fxquant.FxQuantError as exc:
        assert any(n in str(exc) for n in op_names(model, program)), f"{type(exc).__name__} names no op: {exc}"
        return
    own_db = min(fxquant.sqnr(f, q) for f, q in zip(_outputs(model, one), _outputs(qmodel, one), strict=True))
    session = ort_session(result.path, level="basic" if backend == "tensorrt" else "all")
    for x in _other_shapes(program.input_shape, gen):
        try:
            want = _outputs(model, x)
        except RuntimeError:
            continue  # the float model itself fixes this shape (a literal reshape): nothing to compare
        got = _outputs(qmodel, x)  # a raw error here fails the test: run, or raise an FxQuantError naming why
        if any(not w.any() for w in want):
            continue
        db = min(fxquant.sqnr(w, g) for w, g in zip(want, got, strict=True))
        assert db >= min(own_db, MIN_AGREEMENT_DB) - 15, f"{tuple(x.shape)}: {db:.1f} dB vs {own_db:.1f} dB"
        if x.shape[0] > 1:
            alone = _outputs(qmodel, x[:1])
            assert min(fxquant.sqnr(a, g[:1]) for a, g in zip(alone, got, strict=True)) >= MIN_BATCH_AGREEMENT_DB
            if x.shape[1:] == one.shape[1:]:
                ort = [torch.from_numpy(o) for o in run_ort(session, (x,))]
                ort_db = min(fxquant.sqnr(g, o) for g, o in zip(got, ort, strict=True))
                assert ort_db >= MIN_AGREEMENT_DB or low_agreement_reason(want, qmodel, x, ort_db), ort_db


@DEFAULT
@given(programs())
def test_fuzz_pipeline(program: Program) -> None:
    check_program(program)


@SHAPES
@given(programs(), st.sampled_from(BACKENDS))
def test_fuzz_batch_one_example_runs_at_other_batches_and_lengths(program: Program, backend: str) -> None:
    check_shapes(program, backend)


@pytest.mark.fuzz
@LONG
@given(programs(), st.sampled_from(BACKENDS))
def test_fuzz_shapes_long(program: Program, backend: str) -> None:
    check_shapes(program, backend)


@pytest.mark.fuzz
@LONG
@given(programs())
def test_fuzz_pipeline_long(program: Program) -> None:
    check_program(program)
