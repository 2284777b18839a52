"""The evaluation report: matplotlib figures inlined as PNG into one self-contained HTML file."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def tradeoff_figure(summaries: Sequence[dict[str, Any]]) -> str:
    """Distance from P_align vs median perplexity, one point per setting."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for s in summaries:
        err = s["method"].endswith("+err")
        ax.scatter(s["distance"], s["median_perplexity"], marker="s" if err else "o", s=50)
        ax.annotate(
            s["method"], (s["distance"], s["median_perplexity"]), fontsize=8, xytext=(4, 3), textcoords="offset points"
        )
    ax.set_xlabel("mean distance from P_align (lower = more on topic)")
    ax.set_ylabel("median perplexity under the unsteered model")
    ax.set_yscale("log")
    ax.set_title("Topic distance vs perplexity (squares: keep_error on)")
    ax.grid(alpha=0.3)
    return _png(fig)


def histogram_figure(per_method: Mapping[str, Sequence[float]], xlabel: str, title: str) -> str:
    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    for label, values in per_method.items():
        if values:
            ax.hist(values, bins=30, alpha=0.55, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("tokens")
    ax.set_title(title)
    if any(per_method.values()):
        ax.legend()
    return _png(fig)


def curve_figure(
    xs: Sequence[float],
    curves: Mapping[str, Sequence[float]],
    xlabel: str,
    ylabel: str,
    title: str,
    logx: bool = False,
    bands: Mapping[str, tuple[Sequence[float], Sequence[float]]] | None = None,
) -> str:
    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    for label, ys in curves.items():
        ax.plot(xs, ys, marker="o", ms=3, label=label)
        if bands and label in bands:
            ax.fill_between(xs, bands[label][0], bands[label][1], alpha=0.2)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(fig)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v)) if v is not None else "–"


def html_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], table_id: str = "") -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(r.get(c))}</td>" for c in columns) + "</tr>" for r in rows)
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def render_html(title: str, sections: Sequence[tuple[str, str]]) -> str:
    """A page from (heading, html body) sections."""
    parts = [f"<h2>{html.escape(h)}</h2>\n{body}" for h, body in sections]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5rem 0 1.5rem; font-size: 0.9rem; }}
th, td {{ border: 1px solid #ccc; padding: 0.25rem 0.5rem; text-align: left; vertical-align: top; }}
th {{ background: #f2f2f2; }}
img {{ max-width: 100%; }}
.note {{ background: #fff7e0; padding: 0.5rem 1rem; border-left: 4px solid #e0a800; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
{"".join(parts)}
</body></html>
"""


def img(png_b64: str, alt: str) -> str:
    return f'<img class="plot" alt="{html.escape(alt)}" src="data:image/png;base64,{png_b64}">'


def interval_figure(
    rows: Sequence[dict[str, Any]], key: str, xlabel: str, title: str, marked: Sequence[str] = ()
) -> str:
    """One horizontal bar per row: ``row[key]['value']`` with its [lo, hi] interval; labels in
    ``marked`` drawn in a second colour."""
    fig, ax = plt.subplots(figsize=(6.5, 0.3 * len(rows) + 1.2))
    ys = list(range(len(rows)))[::-1]
    vals = [r[key]["value"] for r in rows]
    err = [
        [v - r[key]["lo"] for v, r in zip(vals, rows, strict=True)],
        [r[key]["hi"] - v for v, r in zip(vals, rows, strict=True)],
    ]
    colours = ["#c0392b" if r["setting"] in marked else "#2c7fb8" for r in rows]
    ax.barh(ys, vals, xerr=err, color=colours, alpha=0.8, capsize=2)
    ax.set_yticks(ys, [r["setting"] for r in rows], fontsize=8)
    ax.axvline(0, color="#444", lw=0.8)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="x")
    return _png(fig)
