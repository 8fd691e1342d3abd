"""A self-contained HTML audit report: inline CSS and inline SVG, no scripts, no URLs.

It opens with the verdict (verification, caps, recomputation), then a chart of each
merchant's epsilon over its releases against its cap, then the tables behind them.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence

from common.audit.budgets import BudgetRow
from common.audit.chart import CHART_CSS, epsilon_chart
from common.audit.recompute import Recomputed
from common.audit.verify import AuditResult
from common.ledger import LedgerEntry

_CSS = """
body{font-family:sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #999;padding:4px 8px;text-align:right}
th{background:#eee}
.ok{background:#d8f5d8;padding:1em;border:2px solid #393;max-width:60em}
.bad{background:#fbd8d8;padding:1em;border:2px solid #c33;max-width:60em}
.legend{color:#555;font-size:90%}
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


def _verification(result: AuditResult) -> str:
    signed = "hashes, chain links and signatures" if result.signatures_checked else "hashes"
    if not result.pending:
        server = "no server ledger compared"
    elif sum(result.pending.values()):
        server = (
            f"merchant and server copies agree; {sum(result.pending.values())} merchant "
            "entries not (yet) on the server"
        )
    else:
        server = "merchant and server copies agree"
    return (
        f"VERIFIED: {result.entries} entries of {len(result.chains)} merchants; "
        f"{signed} check out; {server}."
    )


def _findings(budgets: Sequence[BudgetRow], recomputed: Sequence[Recomputed]) -> list[str]:
    """What is wrong with verified ledgers: spending over a cap, under-reported epsilon."""
    over = [b for b in budgets if b.spent > b.cap]
    flagged = [r for r in recomputed if r.flags]
    findings = []
    if over:
        names = ", ".join(f"{b.merchant_id} {b.cohort}" for b in over[:5])
        findings.append(f"{len(over)} cohort(s) spent more than their cap ({names})")
    if flagged:
        names = ", ".join(f"{r.merchant_id} seq {r.seq}" for r in flagged[:5])
        findings.append(
            f"{len(flagged)} entries record less epsilon than dp-accounting computes ({names})"
        )
    return findings


def _verdict(
    result: AuditResult, budgets: Sequence[BudgetRow], recomputed: Sequence[Recomputed]
) -> str:
    if not result.ok:
        return f'<div id="verdict" class="bad">FAILED: {html.escape(str(result.problem))}</div>'
    findings = _findings(budgets, recomputed)
    if findings:
        detail = "PROBLEMS: " + "; ".join(findings) + "."
    else:
        detail = (
            f"Every cohort is within its cap; dp-accounting confirms all {len(recomputed)} "
            "recorded epsilons."
        )
    unsigned = "" if result.signatures_checked else " Signatures were NOT checked."
    state = "bad" if findings or unsigned else "ok"
    return (
        f'<div id="verdict" class="{state}"><b>{html.escape(_verification(result))}</b><br>'
        f"{html.escape(detail)}{unsigned}</div>"
    )


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
    files = "".join(f"<li>{html.escape(f)}</li>" for f in result.files)
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>fedshop privacy audit</title>"
        f"<style>{_CSS}{CHART_CSS}</style></head><body><h1>fedshop privacy audit</h1>"
        f"{_verdict(result, budgets, recomputed)}"
        f"<h2>Epsilon over each merchant's releases, against its cap</h2>{epsilon_chart(chains)}"
        f"<h2>Budgets</h2>{budget_table}"
        f"<h2>Independent recomputation (dp-accounting)</h2>{recompute_table}"
        f"<h2>Ledgers read</h2><ul>{files}</ul></body></html>"
    )
