"""What a PTQ pass did and what it skipped, with reasons."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class PTQReport:
    """One pass's account: ``done`` lines (what changed), ``skipped`` lines (what was left, and why), and
    ``data`` (numbers for programs, e.g. iterations or per-layer losses)."""

    name: str
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    data: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"name": self.name, "done": list(self.done), "skipped": list(self.skipped),
                "data": {k: v for k, v in self.data.items() if isinstance(v, (int, float, str, list, dict))}}

    def summary(self) -> str:
        lines = [f"{self.name}: {len(self.done)} done, {len(self.skipped)} skipped"]
        lines += [f"  done   {line}" for line in self.done]
        lines += [f"  skip   {line}" for line in self.skipped]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def attach(model: object, report: PTQReport) -> None:
    """Record ``report`` in the prepare report of ``model`` (``fxquant.report_of(model).ptq``)."""
    from fxquant.state import get_state

    state = get_state(model)
    if state is not None:
        state.report.ptq[report.name] = report
