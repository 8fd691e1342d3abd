"""Recompute every recorded epsilon with Google's dp-accounting, independently of Opacus.

Each merchant+cohort history is rebuilt as ``SelfComposedDpEvent(PoissonSampledDpEvent(q,
GaussianDpEvent(sigma)), steps)`` events. RDP upper-bounds the tight PLD value, so an entry
whose recorded epsilon is at least the RDP value (minus the tolerance) is accepted without a
PLD computation (PLD costs about 2 s per history); the others, and the last entry of every
cohort, are checked against PLD.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import dp_accounting
from dp_accounting import pld, rdp

from common.accounting import PrivacyUnit
from common.ledger import LedgerEntry

TOLERANCE = 0.02


@dataclass(frozen=True)
class Recomputed:
    """One entry's recorded epsilon next to the independent RDP and PLD values."""

    merchant_id: str
    cohort: str
    seq: int
    delta: float
    recorded: float
    rdp: float
    pld: float | None  # None: not needed (recorded >= RDP - tolerance)
    flags: tuple[str, ...]


def _event(entry: LedgerEntry) -> dp_accounting.DpEvent:
    r = entry.release
    gaussian = dp_accounting.GaussianDpEvent(r.noise_multiplier)
    sampled = dp_accounting.PoissonSampledDpEvent(r.sample_rate, gaussian)
    return dp_accounting.SelfComposedDpEvent(sampled, r.steps)


def pld_epsilon(entries: Sequence[LedgerEntry], *, delta: float) -> float:
    """Tight epsilon of the composed history (dp-accounting PLD)."""
    if any(e.release.noise_multiplier == 0 for e in entries):
        return math.inf
    accountant = pld.PLDAccountant()
    accountant.compose(dp_accounting.ComposedDpEvent([_event(e) for e in entries]))
    return float(accountant.get_epsilon(delta))


def _flags(entry: LedgerEntry, rdp_eps: float, pld_eps: float | None) -> tuple[str, ...]:
    recorded = entry.release.epsilon_after
    flags = []
    if pld_eps is not None and recorded < pld_eps - TOLERANCE:
        flags.append(f"recorded epsilon {recorded:.4f} is below PLD {pld_eps:.4f}")
    if pld_eps is not None and rdp_eps < pld_eps - 1e-9:
        flags.append(f"RDP {rdp_eps:.4f} below PLD {pld_eps:.4f}")
    if recorded > entry.release.epsilon_cap:
        flags.append(f"recorded epsilon {recorded:.4f} exceeds cap {entry.release.epsilon_cap}")
    return tuple(flags)


def recompute_cohort(merchant_id: str, entries: Sequence[LedgerEntry]) -> list[Recomputed]:
    """Check each entry of one merchant+cohort (in ledger order)."""
    out: list[Recomputed] = []
    accountant = rdp.RdpAccountant()
    for index, entry in enumerate(entries):
        delta = entry.release.delta
        if entry.release.noise_multiplier == 0:
            rdp_eps = math.inf
        else:
            accountant.compose(_event(entry))
            rdp_eps = float(accountant.get_epsilon(delta))
        rdp_eps = max(rdp_eps, out[-1].rdp) if out else rdp_eps
        needs_pld = index == len(entries) - 1 or entry.release.epsilon_after < rdp_eps - TOLERANCE
        pld_eps = pld_epsilon(entries[: index + 1], delta=delta) if needs_pld else None
        out.append(
            Recomputed(
                merchant_id=merchant_id,
                cohort=entry.release.cohort,
                seq=entry.seq,
                delta=delta,
                recorded=entry.release.epsilon_after,
                rdp=rdp_eps,
                pld=pld_eps,
                flags=_flags(entry, rdp_eps, pld_eps),
            )
        )
    return out


def recompute_all(
    chains: Mapping[str, Sequence[LedgerEntry]],
    *,
    on_merchant: Callable[[], None] | None = None,
) -> list[Recomputed]:
    """Every entry of every merchant+cohort, sorted by merchant, cohort and seq. Event-level
    histories compose per cohort; customer-level ones across all of the merchant's cohorts.
    ``on_merchant`` is called after each merchant (a progress display)."""
    out: list[Recomputed] = []
    for merchant_id in sorted(chains):
        chain = chains[merchant_id]
        cohorts: dict[str, list[LedgerEntry]] = {}
        if any(e.release.privacy_unit is PrivacyUnit.CUSTOMER for e in chain):
            cohorts["*"] = list(chain)  # a customer can be in every cohort: compose them all
        else:
            for entry in chain:
                cohorts.setdefault(entry.release.cohort, []).append(entry)
        for cohort in sorted(cohorts):
            out.extend(recompute_cohort(merchant_id, cohorts[cohort]))
        if on_merchant is not None:
            on_merchant()
    return out


def final_rows(results: Sequence[Recomputed]) -> list[Recomputed]:
    """The last entry of each merchant+cohort (what the summary table shows)."""
    last: dict[tuple[str, str], Recomputed] = {}
    for item in results:
        last[(item.merchant_id, item.cohort)] = item
    return [last[key] for key in sorted(last)]
