"""The reports: the prepare report (what was quantized, what passes through, what stayed float and why) and each
PTQ pass's report (what it did and skipped, with reasons), which the prepare report holds in ``ptq``."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from torch import fx, nn

from fxquant.provenance import read
from fxquant.quantizer import quantizers_of
from fxquant.rules.context import Annotations
from fxquant.rules.pattern import GraphView


@dataclass(frozen=True)
class OpEntry:
    node: str
    kind: str
    detail: str  # the rule that quantized it, or the reason it stayed float


@dataclass
class PTQReport:
    """One pass's account: ``done`` lines (what changed), ``skipped`` lines (what was left, and why), and
    ``data`` (numbers for programs, e.g. iterations or per-layer losses)."""

    name: str
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    data: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        """JSON-ready: tensors (e.g. AdaRound's codes) and option objects are left out of ``data``."""
        return {"name": self.name, "done": list(self.done), "skipped": list(self.skipped),
                "data": _plain(self.data)}

    def summary(self) -> str:
        lines = [f"{self.name}: {len(self.done)} done, {len(self.skipped)} skipped"]
        lines += [f"  done   {line}" for line in self.done]
        lines += [f"  skip   {line}" for line in self.skipped]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def _plain(value: object) -> object:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if _plain(v) is not _DROP}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value if _plain(v) is not _DROP]
    return value if isinstance(value, (int, float, str, bool)) or value is None else _DROP


_DROP = object()


@dataclass
class PrepareReport:
    """Filled by prepare(); ``summary()`` renders it, ``as_dict()`` and ``counts()`` give it as data.

    Node names of parts traced separately (when the root could not be traced whole) are prefixed with the
    part's module path, e.g. ``encoder.layer_0_output_dense``; layers quantized by module swap in eager code
    are listed by their module path.
    """

    backend: str
    quantized: list[OpEntry] = field(default_factory=list)
    passthrough: list[OpEntry] = field(default_factory=list)
    float_ops: list[OpEntry] = field(default_factory=list)
    folded_bn: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # notes of passes that skipped something
    ptq: dict = field(default_factory=dict)  # PTQ pass name -> PTQReport
    activation_quantizers: int = 0
    weight_quantizers: int = 0
    traced: list[str] = field(default_factory=list)  # module paths traced as graphs ("" is the root)
    eager: list[OpEntry] = field(default_factory=list)  # modules run eagerly: (path, class name, reason)
    notes: list[str] = field(default_factory=list)  # arguments fixed while tracing, modules never called

    def absorb(self, other: PrepareReport, prefix: str) -> None:
        """Add the report of a part traced at module path ``prefix`` ("" for the root)."""
        def name(n: str) -> str:
            return f"{prefix}.{n}" if prefix else n

        def rows(entries: list[OpEntry]) -> list[OpEntry]:
            return [OpEntry(name(e.node), e.kind, e.detail) for e in entries]

        self.quantized += rows(other.quantized)
        self.passthrough += rows(other.passthrough)
        self.float_ops += rows(other.float_ops)
        self.folded_bn += [name(b) for b in other.folded_bn]
        self.skipped += [f"`{prefix}`: {note}" if prefix else note for note in other.skipped]
        for pass_name, r in other.ptq.items():
            self.ptq[name(pass_name)] = r

    def count_quantizers(self, root: nn.Module) -> None:
        """Count the weight (constant) and activation quantizers of the prepared model ``root``."""
        quantizers = list(quantizers_of(root).values())
        self.weight_quantizers = sum(1 for q in quantizers if q.constant)
        self.activation_quantizers = len(quantizers) - self.weight_quantizers

    def counts(self) -> dict[str, dict[str, int]]:
        """Ops per kind: ``{kind: {"quantized": n, "pass-through": n, "float": n}}`` (zeros included)."""
        table: dict[str, dict[str, int]] = {}
        for column, entries in (("quantized", self.quantized), ("pass-through", self.passthrough),
                                ("float", self.float_ops)):
            for kind, n in Counter(e.kind for e in entries).items():
                table.setdefault(kind, {"quantized": 0, "pass-through": 0, "float": 0})[column] = n
        return dict(sorted(table.items()))

    def as_dict(self) -> dict:
        def rows(entries: list[OpEntry]) -> list[dict]:
            return [{"node": e.node, "kind": e.kind, "detail": e.detail} for e in entries]

        return {
            "backend": self.backend,
            "quantized": rows(self.quantized),
            "passthrough": rows(self.passthrough),
            "float": rows(self.float_ops),
            "folded_bn": list(self.folded_bn),
            "skipped": list(self.skipped),
            "activation_quantizers": self.activation_quantizers,
            "weight_quantizers": self.weight_quantizers,
            "ptq": {name: r.as_dict() for name, r in self.ptq.items()},
            "traced": list(self.traced),
            "eager": [{"module": e.node, "class": e.kind, "reason": e.detail} for e in self.eager],
            "notes": list(self.notes),
            "counts": {"quantized": dict(Counter(e.kind for e in self.quantized)),
                       "passthrough": dict(Counter(e.kind for e in self.passthrough)),
                       "float": dict(Counter(e.kind for e in self.float_ops))},
            "counts_by_kind": self.counts(),
        }

    def headline(self) -> str:
        """One line: how many ops were quantized, passed through, left float; quantizers; folded BatchNorms."""
        kinds = Counter(e.kind for e in self.quantized)
        eager = f", {len(self.eager)} module(s) run eagerly" if self.eager else ""
        return (f"fxquant prepare ({self.backend}): {len(self.quantized)} ops quantized "
                f"({', '.join(f'{k} {n}' for k, n in sorted(kinds.items()))}), "
                f"{len(self.passthrough)} pass-through, {len(self.float_ops)} float{eager}; "
                f"{self.activation_quantizers} activation + {self.weight_quantizers} weight quantizers; "
                f"{len(self.folded_bn)} BatchNorm folded")

    def summary(self, ops: bool = True) -> str:
        """The headline, a table of ops per kind, then (with ``ops``) every quantized op with its rule, every
        float op with the reason, every module that ran eagerly with the reason, and notes."""
        lines = [self.headline()]
        counts = self.counts()
        if counts:
            width = max(len(k) for k in counts) + 2
            lines.append(f"  {'kind':<{width}}{'quantized':>10}{'pass-through':>14}{'float':>7}")
            lines += [f"  {kind:<{width}}{c['quantized']:>10}{c['pass-through']:>14}{c['float']:>7}"
                      for kind, c in counts.items()]
        if ops:
            width = max((len(e.node) for e in (*self.quantized, *self.float_ops)), default=0)
            lines += [f"  quant  {e.node:<{width}}  {e.kind:<12} {e.detail}" for e in self.quantized]
            lines += [f"  float  {e.node:<{width}}  {e.kind:<12} {e.detail}" for e in self.float_ops]
        lines += [f"  eager  {e.node or '<root>'} ({e.kind}): {e.detail}" for e in self.eager]
        lines += [f"  skip   {note}" for note in self.skipped]
        lines += [f"  note   {note}" for note in self.notes]
        for r in self.ptq.values():
            lines += ["  " + line for line in r.summary().splitlines()]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def graph_report(gm: fx.GraphModule, backend: str, ann: Annotations, notes: list[str], ptq: dict) -> PrepareReport:
    """The report of one prepared graph: what the rules decided (``ann``), what the passes skipped (``notes``),
    the BatchNorms folded and the PTQ passes' reports."""
    kinds = GraphView(gm).kinds
    report = PrepareReport(backend)
    report.quantized = [OpEntry(n.name, kinds.get(n, "?"), rule) for n, rule in ann.quantized.items()]
    report.passthrough = [OpEntry(n.name, kinds.get(n, "?"), _passthrough_detail(n)) for n in ann.passthrough]
    report.float_ops = [OpEntry(n.name, kinds.get(n, "?"), why) for n, why in ann.floats.items()]
    report.folded_bn = [read(n).folded_bn for n in gm.graph.nodes if read(n).folded_bn]
    report.skipped = list(notes)
    report.ptq.update(ptq)
    report.count_quantizers(gm)
    return report


def _passthrough_detail(node: fx.Node) -> str:
    merged = read(node).pad_merged_into
    return f"merged into the ONNX Conv pads of {merged} by export_onnx" if merged else "pass-through"
