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

