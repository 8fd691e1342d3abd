"""Budget table: per merchant and cohort, what was spent against which cap."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from common.ledger import LedgerEntry, ReleaseSummary, VerifiedChain


@dataclass(frozen=True)
class BudgetRow:
    """One merchant+cohort: the last recorded cumulative epsilon and its cap."""

    merchant_id: str
    cohort: str
    privacy_unit: str
    delta: float
    spent: float
    cap: float
    remaining: float
    releases: int
    last_release_utc: str


def release_summaries(chain: Sequence[LedgerEntry]) -> Sequence[ReleaseSummary]:
    # A VerifiedChain carries its summaries: the table then needs no parsed entries.
    if isinstance(chain, VerifiedChain):
        return chain.summaries
    return [ReleaseSummary.of(entry.release) for entry in chain]


def budget_rows(chains: Mapping[str, Sequence[LedgerEntry]]) -> list[BudgetRow]:
    """Rows sorted by merchant and cohort (entries must be verified chains, in order)."""
    rows: list[BudgetRow] = []
    for merchant_id in sorted(chains):
        last: dict[str, ReleaseSummary] = {}
        counts: dict[str, int] = {}
        for summary in release_summaries(chains[merchant_id]):
            last[summary.cohort] = summary
            counts[summary.cohort] = counts.get(summary.cohort, 0) + 1
        for cohort in sorted(last):
            release = last[cohort]
            rows.append(
                BudgetRow(
                    merchant_id=merchant_id,
                    cohort=cohort,
                    privacy_unit=release.privacy_unit,
                    delta=release.delta,
                    spent=release.epsilon_after,
                    cap=release.epsilon_cap,
                    remaining=release.epsilon_cap - release.epsilon_after,
                    releases=counts[cohort],
                    last_release_utc=release.created_utc,
                )
            )
    return rows


def epsilon_series(chain: Sequence[LedgerEntry]) -> dict[str, list[tuple[str, float, float]]]:
    """Per cohort: (created_utc, epsilon_after, epsilon_cap) in ledger order, for plots."""
    series: dict[str, list[tuple[str, float, float]]] = {}
    for r in release_summaries(chain):
        series.setdefault(r.cohort, []).append((r.created_utc, r.epsilon_after, r.epsilon_cap))
    return series
