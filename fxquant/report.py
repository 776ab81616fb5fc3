"""The prepare report: what was quantized, what passes through, what stayed float and why."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass(frozen=True)
class OpEntry:
    node: str
    kind: str
    detail: str  # the rule that quantized it, or the reason it stayed float


@dataclass
class PrepareReport:
    """Filled by prepare(); ``summary()`` renders it, ``as_dict()`` gives it as data."""

    backend: str
    quantized: list[OpEntry] = field(default_factory=list)
    passthrough: list[OpEntry] = field(default_factory=list)
    float_ops: list[OpEntry] = field(default_factory=list)
    folded_bn: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # notes of passes that skipped something
    ptq: dict = field(default_factory=dict)  # PTQ pass name -> fxquant.ptq.report.PTQReport
    activation_quantizers: int = 0
    weight_quantizers: int = 0

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
            "counts": {"quantized": dict(Counter(e.kind for e in self.quantized)),
                       "float": dict(Counter(e.kind for e in self.float_ops))},
        }

    def summary(self) -> str:
        kinds = Counter(e.kind for e in self.quantized)
        lines = [
            f"fxquant prepare ({self.backend}): {len(self.quantized)} ops quantized "
            f"({', '.join(f'{k} {n}' for k, n in sorted(kinds.items()))}), "
            f"{len(self.passthrough)} pass-through, {len(self.float_ops)} float; "
            f"{self.activation_quantizers} activation + {self.weight_quantizers} weight quantizers; "
            f"{len(self.folded_bn)} BatchNorm folded",
        ]
        lines += [f"  float  {e.node} ({e.kind}): {e.detail}" for e in self.float_ops]
        lines += [f"  skip   {note}" for note in self.skipped]
        for r in self.ptq.values():
            lines += ["  " + line for line in r.summary().splitlines()]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()
