"""The result of ``fxquant.sensitivity`` (``SensitivityReport``) and its renderings: a text table, and one
self-contained HTML file with the plot embedded as a PNG.

matplotlib is optional (``pip install fxquant[report]``): without it the HTML has the tables and says how to
get the plot.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from dataclasses import asdict, dataclass, field

from fxquant.errors import ConfigError
from fxquant.files import output_path, write_text


@dataclass(frozen=True)
class LayerSensitivity:
    """SQNRs (dB, against the float model) of one layer; ``rank`` 1 is the most harmful layer."""

    name: str
    kind: str
    index: int
    rank: int
    model_only_db: float
    model_cumulative_db: float
    output_only_db: float
    output_cumulative_db: float
    quantizers: tuple[str, ...]


@dataclass
class SensitivityReport:
    """Result of ``sensitivity()``: layers in topological order, ``ranked()`` most harmful first."""

    backend: str
    layers: list[LayerSensitivity]
    full_db: float  # model output with every quantizer on
    num_batches: int
    notes: list[str] = field(default_factory=list)

    def ranked(self) -> list[LayerSensitivity]:
        """Layers sorted by ``model_only_db``, lowest (most harmful) first."""
        return sorted(self.layers, key=lambda s: s.rank)

    def as_dict(self) -> dict:
        return {"backend": self.backend, "full_db": self.full_db, "num_batches": self.num_batches,
                "notes": list(self.notes), "layers": [asdict(s) for s in self.layers]}

    def table(self, limit: int | None = None) -> str:
        """A plain-text table of the ranked layers."""
        rows = self.ranked()[:limit]
        width = max([len("layer"), *(len(s.name) for s in rows)])
        lines = [f"{'rank':>4}  {'layer':<{width}}  {'kind':<8} {'only dB':>8} {'upto dB':>8} "
                 f"{'out only':>8} {'out upto':>8}"]
        lines += [f"{s.rank:>4}  {s.name:<{width}}  {s.kind:<8} {_fmt(s.model_only_db):>8} "
                  f"{_fmt(s.model_cumulative_db):>8} {_fmt(s.output_only_db):>8} {_fmt(s.output_cumulative_db):>8}"
                  for s in rows]
        return "\n".join(lines)

    def write_html(self, path: str, title: str = "fxquant sensitivity report") -> str:
        """Write a self-contained HTML report (plots embedded as PNG when matplotlib is installed)."""
        return write_html(self, path, title)


def _fmt(db: float) -> str:
    return "inf" if math.isinf(db) else f"{db:.1f}"


NO_MATPLOTLIB = "Plots need matplotlib, which is not installed: pip install 'fxquant[report]' (or matplotlib)."


def _finite(values: list[float], cap: float) -> list[float]:
    return [cap if math.isinf(v) and v > 0 else (0.0 if math.isnan(v) else v) for v in values]


def plot_png(report: SensitivityReport, worst: int = 3, dpi: int = 80) -> bytes | None:
    """The report's plot as PNG bytes, or None when matplotlib is missing.

    Left: model-output SQNR with only each layer quantized (the ``worst`` layers in red). Right: SQNR with
    every layer up to each one quantized, at the model output and at the layer's own output.
    """
    try:
        import matplotlib  # lazy: matplotlib is the optional [report] extra

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # lazy: as above
    except ImportError:
        return None
    layers = report.layers
    names = [s.name for s in layers]
    finite = [v for s in layers for v in (s.model_only_db, s.model_cumulative_db, s.output_cumulative_db)
              if math.isfinite(v)]
    cap = max(finite, default=60.0) + 5
    y = list(range(len(layers)))
    worst_idx = {s.index for s in report.ranked()[:worst]}
    fig, (left, right) = plt.subplots(1, 2, sharey=True, figsize=(9, 1.2 + 0.28 * len(layers)),
                                      gridspec_kw={"width_ratios": [1, 1]})
    colors = ["#d62728" if i in worst_idx else "#4c72b0" for i in y]
    left.barh(y, _finite([s.model_only_db for s in layers], cap), color=colors)
    low = min([*finite, report.full_db] if math.isfinite(report.full_db) else finite, default=0.0)
    left.set_xlim(max(0.0, math.floor(low / 5) * 5 - 5), cap)
    left.set_yticks(y, names, fontsize=8)
    left.invert_yaxis()
    left.set_xlabel("model output SQNR (dB), only this layer quantized")
    left.axvline(report.full_db, color="gray", linestyle="--", linewidth=1)
    left.text(report.full_db, -0.7, " all quantized", color="gray", fontsize=7, va="bottom")
    right.plot(_finite([s.model_cumulative_db for s in layers], cap), y, "o-", label="model output", markersize=3)
    right.plot(_finite([s.output_cumulative_db for s in layers], cap), y, "s--", label="layer output",
               markersize=3)
    right.set_xlabel("SQNR (dB), this layer and all before it quantized")
    right.legend(fontsize=7, loc="lower right")
    for ax in (left, right):
        ax.grid(axis="x", alpha=0.3)
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle(f"fxquant sensitivity ({report.backend}): red = {worst} most harmful layers", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()


def _cell(value: float) -> str:
    return "inf" if math.isinf(value) else ("n/a" if math.isnan(value) else f"{value:.1f}")


def render_html(report: SensitivityReport, title: str = "fxquant sensitivity report") -> str:
    """The report as one HTML document (no external files)."""
    png = plot_png(report)
    figure = (f'<img alt="sensitivity plot" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
              if png is not None else f'<p class="note">{html.escape(NO_MATPLOTLIB)}</p>')
    rows = "\n".join(
        f"<tr><td>{s.rank}</td><td>{s.index}</td><td><code>{html.escape(s.name)}</code></td>"
        f"<td>{html.escape(s.kind)}</td><td>{_cell(s.model_only_db)}</td><td>{_cell(s.model_cumulative_db)}</td>"
        f"<td>{_cell(s.output_only_db)}</td><td>{_cell(s.output_cumulative_db)}</td>"
        f"<td>{html.escape(', '.join(s.quantizers))}</td></tr>" for s in report.ranked())
    notes = "".join(f'<p class="note">{html.escape(n)}</p>' for n in report.notes)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; font-size: 13px; }}
th, td {{ border: 1px solid #ccc; padding: 3px 8px; text-align: right; }}
td:nth-child(3), td:nth-child(4), td:nth-child(9) {{ text-align: left; }}
th {{ background: #f0f0f0; }}
.note {{ color: #a15c00; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>Backend <b>{html.escape(report.backend)}</b>; {len(report.layers)} quantized layers; {report.num_batches}
batch(es). SQNR in dB against the float model (higher is better). Model output with every quantizer on:
<b>{_cell(report.full_db)} dB</b>.</p>
{notes}
{figure}
<h2>Layers, most harmful first</h2>
<table>
<tr><th>rank</th><th>#</th><th>layer</th><th>kind</th><th>model, only this layer</th>
<th>model, up to this layer</th><th>layer output, only this layer</th><th>layer output, up to this layer</th>
<th>quantizers</th></tr>
{rows}
</table>
<p>"Only this layer": every other quantizer off. "Up to this layer": this layer and every layer before it in
topological order quantized (column #). Keep the top-ranked layers in float with
<code>fxquant.mixed_precision(...)</code> or <code>Override(name, exclude=True)</code>.</p>
</body></html>
"""


def write_html(report: SensitivityReport, path: str | os.PathLike, title: str = "fxquant sensitivity report") -> str:
    """Write ``render_html(report)`` to ``path``; returns the path."""
    path = output_path(path, "report", ConfigError)
    write_text(path, render_html(report, title))
    return path
