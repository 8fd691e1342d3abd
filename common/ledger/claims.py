"""Which releases compose, and the platform's recomputation of what a release claims.

A merchant states its epsilon in every signed release; the platform's budget view, the
registry and the dashboards rest on that figure. So the platform does not take it on trust:
at ingest it recomputes epsilon from the (sigma, q, steps) of every release that composes
with the new one, with the accountant the release names, and refuses a release that claims
less, or whose epsilon goes down within its cohort.
"""

from __future__ import annotations

from collections.abc import Sequence

from common.accounting import AccountantKind, PrivacyUnit, epsilon_spent
from common.ledger.entry import LedgerEntry
from common.ledger.release import PrivacyRelease

RELATIVE_TOLERANCE = 1e-6  # the same library gives the same figure; allow float noise only


def composes_with(earlier: PrivacyRelease, *, unit: PrivacyUnit, cohort: str) -> bool:
    """Event-level spend composes within a data cohort (an event lives in one cohort); a
    customer can appear in every cohort, so customer-level spend composes over all releases."""
    return unit is PrivacyUnit.CUSTOMER or earlier.cohort == cohort


def composition_history(
    chain: Sequence[LedgerEntry], *, unit: PrivacyUnit, cohort: str
) -> list[LedgerEntry]:
    """The entries of ``chain`` that a new release of ``unit`` on ``cohort`` adds to."""
    return [e for e in chain if composes_with(e.release, unit=unit, cohort=cohort)]


def claim_problem(chain: Sequence[LedgerEntry], entry: LedgerEntry) -> str | None:
    """Why ``entry``'s stated epsilon cannot be right given the merchant's earlier releases
    ``chain`` (oldest first), or None."""
    release = entry.release
    history = composition_history(chain, unit=release.privacy_unit, cohort=release.cohort)
    steps = [e.release.mechanism_step for e in history] + [release.mechanism_step]
    recomputed = epsilon_spent(steps, delta=release.delta, accountant=release.accountant)
    if release.epsilon_after < recomputed * (1 - RELATIVE_TOLERANCE) - 1e-9:
        return (
            f"states epsilon {release.epsilon_after:.6f} but its history gives "
            f"{recomputed:.6f} ({release.accountant.value})"
        )
    rdp = epsilon_spent(steps, delta=release.delta, accountant=AccountantKind.RDP)
    if release.epsilon_rdp < rdp * (1 - RELATIVE_TOLERANCE) - 1e-9:
        return f"states RDP epsilon {release.epsilon_rdp:.6f} but its history gives {rdp:.6f}"
    same_cohort = [e for e in history if e.release.cohort == release.cohort]
    last = same_cohort[-1] if same_cohort else None
    if last is not None and release.epsilon_after < last.release.epsilon_after - 1e-9:
        return (
            f"epsilon {release.epsilon_after:.6f} is below the {last.release.epsilon_after:.6f} "
            f"of seq {last.seq} in cohort {release.cohort!r}: spend never goes down"
        )
    return None
