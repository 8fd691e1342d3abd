"""A self-contained HTML audit report: inline CSS and inline SVG plots, no external URLs."""

from __future__ import annotations

import html
import io
import math
import re
from collections.abc import Mapping, Sequence

from common.audit.budgets import BudgetRow, epsilon_series
from common.audit.recompute import Recomputed
from common.audit.verify import AuditResult
from common.ledger import LedgerEntry

_CSS = """
body{font-family:sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #999;padding:4px 8px;text-align:right}
th{background:#eee}
.ok{background:#d8f5d8;padding:1em;border:2px solid #393}
.bad{background:#fbd8d8;padding:1em;border:2px solid #c33}
.flag{color:#b00;font-weight:bold}
"""


def _cell(value: object) -> str:
    text = str(value)
    flagged = " class='flag'" if "below" in text or "exceeds" in text else ""
    return f"<td{flagged}>{html.escape(text)}</td>"


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]], css_id: str) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join('<tr class="row">' + "".join(_cell(c) for c in row) + "</tr>" for row in rows)
    return f'<table id="{css_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return "inf" if math.isinf(value) else f"{value:.4f}"


def _plot(merchant_id: str, chain: Sequence[LedgerEntry]) -> str:
    """Epsilon after each release, per cohort, against the cap (inline SVG)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(6, 3))
    axes = figure.subplots()
    for cohort, points in epsilon_series(chain).items():
        xs = list(range(1, len(points) + 1))
        axes.plot(xs, [p[1] for p in points], marker="o", label=f"{cohort} spent")
        axes.step(xs, [p[2] for p in points], where="post", linestyle="--", label=f"{cohort} cap")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("release (ledger order)")
    axes.set_ylabel("epsilon")
    axes.set_title(f"merchant {merchant_id}")
    axes.legend(fontsize="small")
    figure.tight_layout()
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg")
    svg = buffer.getvalue()
    svg = svg[svg.index("<svg") :]
    # Inline SVG needs no namespace URLs or metadata links: keep the report free of URLs.
    svg = re.sub(r"<metadata>.*?</metadata>", "", svg, flags=re.DOTALL)
    svg = re.sub(r'\s+xmlns(:\w+)?="[^"]*"', "", svg)
    return f'<div class="plot" data-merchant="{html.escape(merchant_id)}">{svg}</div>'


def _verdict(result: AuditResult) -> str:
    if result.ok:
        signed = "hashes, chain links and signatures" if result.signatures_checked else "hashes"
        if result.pending:
            server = (
                f"merchant and server copies agree; {sum(result.pending.values())} merchant "
                "entries not (yet) on the server"
            )
        else:
            server = "no server ledger compared"
        return (
            f'<div id="verdict" class="ok">VERIFIED: {result.entries} entries of '
            f"{len(result.chains)} merchants; {signed} check out; {server}.</div>"
        )
    return f'<div id="verdict" class="bad">FAILED: {html.escape(str(result.problem))}</div>'


def render_report(
    result: AuditResult,
    budgets: Sequence[BudgetRow],
    recomputed: Sequence[Recomputed],
    chains: Mapping[str, Sequence[LedgerEntry]],
) -> str:
    """The whole report as one HTML string."""
    budget_table = _table(
        ["merchant", "cohort", "unit", "delta", "spent", "cap", "remaining", "releases", "last"],
        [
            (
                b.merchant_id,
                b.cohort,
                b.privacy_unit,
                f"{b.delta:g}",
                _fmt(b.spent),
                _fmt(b.cap),
                _fmt(b.remaining),
                b.releases,
                b.last_release_utc,
            )
            for b in budgets
        ],
        "budgets",
    )
    recompute_table = _table(
        [
            "merchant",
            "cohort",
            "seq",
            "accountant",
            "recorded",
            "recorded RDP",
            "PLD",
            "RDP",
            "flags",
        ],
        [
            (
                r.merchant_id,
                r.cohort,
                r.seq,
                r.accountant,
                _fmt(r.recorded),
                _fmt(r.recorded_rdp),
                _fmt(r.pld),
                _fmt(r.rdp),
                "; ".join(r.flags) or "ok",
            )
            for r in recomputed
        ],
        "recompute",
    )
    plots = "".join(_plot(m, chains[m]) for m in sorted(chains) if chains[m])
    files = "".join(f"<li>{html.escape(f)}</li>" for f in result.files)
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>fedshop privacy audit</title>"
        f"<style>{_CSS}</style></head><body><h1>fedshop privacy audit</h1>"
        f"<h2>Verification</h2>{_verdict(result)}<ul>{files}</ul>"
        f"<h2>Budgets</h2>{budget_table}"
        f"<h2>Independent recomputation (dp-accounting)</h2>{recompute_table}"
        f"<h2>Epsilon over time</h2>{plots}</body></html>"
    )
