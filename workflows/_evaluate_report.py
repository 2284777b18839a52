"""HTML rendering of an evaluation report (the dict written to report.json)."""

from __future__ import annotations

import html
from typing import Any

from ops.evals import report as R


def _flat(rows: list[dict[str, Any]], key: str) -> list[float]:
    return [v for r in rows for v in r[key] if v is not None]


def _opt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _summary_html(report: dict[str, Any]) -> str:
    vs = report["swap_vs_orig"]
    rec = report["recommendation"]
    if rec["method"] is None:
        lines = [f"<p><b>Recommended default:</b> none — {html.escape(rec['reason'])}.</p>"]
    else:
        lines = [
            f"<p><b>Recommended default:</b> {html.escape(rec['method'])} — {html.escape(rec['reason'])} "
            f"(distance {rec['distance']:.4f}, perplexity {rec['perplexity_ratio']:.2f}× orig).</p>"
        ]
    if vs:
        lines.append("<ul>")
        lines.append(
            f"<li>Swap closer to the topic than orig on {vs['swap_closer_than_orig_share']:.0%} of prompts.</li>"
        )
        lines.append(f"<li>Swap median perplexity {vs['swap_perplexity_ratio']:.2f}× orig.</li>")
        lines.append(
            f"<li>Mean contamination: Swap {_opt(vs['swap_contamination'])}, "
            f"Clamp {_opt(vs['clamp_contamination'])}.</li>"
        )
        lines.append("</ul>")
    lines.append(
        '<p class="note">Acceptability (CoLA) is unavailable: no CoLA classifier is installed '
        "offline, so it is not reported.</p>"
    )
    return "\n".join(lines)


def _examples(report: dict[str, Any], n: int = 6) -> str:
    gens = report["generations"]
    methods = list(gens)
    rows = []
    for i, prompt in enumerate(report["prompts"][:n]):
        row = {"prompt": prompt}
        row.update({m: gens[m][i]["text"] for m in methods})
        rows.append(row)
    return R.html_table(rows, ["prompt", *methods], "examples")


def render(report: dict[str, Any]) -> str:
    gens = report["generations"]
    summary = report["summary"]
    cols = [
        "method",
        "n",
        "distance",
        "distance_std",
        "median_perplexity",
        "perplexity",
        "contamination",
        "latents_changed",
        "closer_than_orig",
        "s_per_token",
        "acceptability",
    ]
    check = report["topk_check"]
    cov = report["coverage"]
    sizes = sorted({c["size"] for c in cov})
    cov_curves, cov_bands = {}, {}
    for t in sorted({c["threshold"] for c in cov}):
        pts = [c for c in cov if c["threshold"] == t]
        cov_curves[f"support ≥ {t}"] = [p["mean"] for p in pts]
        cov_bands[f"support ≥ {t}"] = ([p["low"] for p in pts], [p["high"] for p in pts])
    hist_methods = [m for m in ("clamp", "swap") if m in gens]
    costs = report["costs"]
    cost_rows = [{"stage": "set-up (" + k + ")", "seconds": v} for k, v in costs["set_up"].items()]
    cost_rows += [{"stage": "per topic (" + k + ")", "seconds": v} for k, v in costs["per_topic"].items()]
    step = f"per token: one decode step of a batch of {costs['per_token_batch']} rows"
    cost_rows += [{"stage": f"{step} ({k})", "seconds": v} for k, v in costs["per_token"].items()]
    sections = [
        ("Summary", _summary_html(report)),
        ("Methods", R.html_table(summary, cols, "summary")),
        ("Topic distance vs perplexity", R.img(R.tradeoff_figure(summary), "trade-off")),
        ("Examples", _examples(report)),
        (
            "Latents changed per token (Fig. 5)",
            R.img(
                R.histogram_figure(
                    {m: _flat(gens[m], "latents_changed_per_token") for m in hist_methods},
                    "latents changed vs plain SAE",
                    "Latents changed per generated token",
                ),
                "latents changed",
            ),
        ),
        (
            "Contamination per token (Fig. 6)",
            R.img(
                R.histogram_figure(
                    {m: _flat(gens[m], "contamination_per_token") for m in hist_methods},
                    "contamination",
                    "Contamination per generated token",
                ),
                "contamination",
            ),
        ),
        (
            "Top-k check (Fig. 4)",
            R.img(
                R.curve_figure(
                    check["ks"],
                    {"aligned text": check["aligned"], "unaligned text": check["unaligned"]},
                    "k",
                    "share of tokens firing a top-k latent",
                    "Top-k scored latents on aligned vs unaligned text",
                ),
                "top-k check",
            )
            + f"<p>aligned above unaligned for every k: {check['passed']}</p>",
        ),
        (
            "Coverage (Fig. 3)",
            R.img(
                R.curve_figure(
                    sizes,
                    cov_curves,
                    "pool size",
                    "share of latents",
                    "Latent coverage by pool size",
                    logx=True,
                    bands=cov_bands,
                ),
                "coverage",
            ),
        ),
        ("Costs (Tables 3–4)", R.html_table(cost_rows, ["stage", "seconds"], "costs")),
    ]
    return R.render_html(f"saealign evaluation: topic '{report['topic']['topic']}'", sections)


def _interval(stat: dict[str, float] | None, fmt: str) -> str:
    if not stat or stat["value"] is None or stat["value"] != stat["value"]:
        return "–"
    return f"{stat['value']:{fmt}} [{stat['lo']:{fmt}}, {stat['hi']:{fmt}}]"


_SUITE_COLUMNS = {
    "setting": "setting",
    "shift": "distance shift vs orig [95 % CI]",
    "closer": "share of prompts closer than orig",
    "win_vs_prompting": "win rate vs prompting",
    "ppl_ratio": "perplexity × orig (judge)",
    "distinct2": "distinct-2",
    "contamination": "contamination",
}


def _suite_table(rows: list[dict[str, Any]]) -> str:
    fmts = {"shift": "+.3f", "closer": ".2f", "win_vs_prompting": ".2f", "ppl_ratio": ".2f"}
    table = []
    for r in rows:
        cells = {k: _interval(r.get(k), f) for k, f in fmts.items()}
        cells |= {"setting": r["setting"], "distinct2": r["distinct2"], "contamination": r["contamination"]}
        table.append({_SUITE_COLUMNS[k]: v for k, v in cells.items()})
    return R.html_table(table, list(_SUITE_COLUMNS.values()))


def render_suite(report: dict[str, Any]) -> str:
    """The multi-topic report: protocol, chosen knobs, pooled and per-topic tables with a plot each."""
    proto = report["protocol"]
    best = report["best_sae_setting"]
    judge = report["judge"]
    chosen = [s for s in report["settings"] if s["knob"]]
    intro = (
        f"<p>Topics: {', '.join(map(html.escape, report['topics']))}. {len(report['prompts'])} prompts cut into a dev "
        f"half ({len(proto['dev_prompts'])}) and a test half ({len(proto['test_prompts'])}); knobs chosen on the dev "
        f"half (seed {proto['dev_seed']}) by one rule for all topics: {html.escape(proto['rule'])}. Reported: test "
        f"half, seeds {proto['seeds']}, {proto['bootstrap']} bootstrap resamples of prompts.</p>"
        f"<p><b>Best SAE setting</b> (chosen on the dev half): {html.escape(str(best))}. "
        f"<b>Perplexity judge</b>: {html.escape(judge['name'])} ({html.escape(judge['scope'])}); distinct-2 on "
        "the steered model's tokens. Distance: minimum embedding distance to the topic's align texts (negative "
        "shift = closer).</p>"
    )
    knob_rows = [
        {"setting": s["label"], "knob": s["knob"], "grid": s["grid"], "chosen": s["chosen"]}
        | {
            "dev (value: shift, ppl ×)": "; ".join(
                f"{t['value']}: {t['shift']:+.3f}, {t['ppl_ratio']:.2f}"
                for t in report["dev"]["settings"][s["label"]]["tried"]
            )
        }
        for s in chosen
    ]
    what = [
        {"setting": s["label"], "what it does": s["what"], "uses the SAE": s["uses_sae"]} for s in report["settings"]
    ]
    marked = [best] if best else []
    sections = [
        ("Protocol", intro),
        ("Settings", R.html_table(what, ["setting", "what it does", "uses the SAE"])),
        (
            "Knobs chosen on the dev half",
            R.html_table(knob_rows, ["setting", "knob", "grid", "chosen", "dev (value: shift, ppl ×)"]),
        ),
        (
            "Pooled over topics (test half)",
            _suite_table(report["pooled"])
            + R.img(R.interval_figure(report["pooled"], "shift", "distance shift vs orig", "pooled", marked), "pooled"),
        ),
    ]
    for topic, rows in report["per_topic"].items():
        plot = R.interval_figure(rows, "shift", "distance shift vs orig", f"topic {topic}", marked)
        sections.append((f"Topic {topic} (test half)", _suite_table(rows) + R.img(plot, f"topic {topic}")))
    examples = "".join(
        f"<p><b>{html.escape(g['setting'])}</b> ({html.escape(str(g['topic']))}): <i>{html.escape(g['prompt'])}</i> "
        f"{html.escape(g['text'])}</p>"
        for g in report["generations"]
    )
    sections.append(("Examples (test half, first seed)", examples))
    return R.render_html("saealign evaluation: several topics", sections)
