"""Recompute every recorded epsilon with Google's dp-accounting, from the logged mechanisms.

Each release states two figures: ``epsilon_after`` by the accountant it names (PLD by default)
and ``epsilon_rdp``, the RDP bound. The auditor rebuilds the history every release composes
with (its cohort for event-level releases, every earlier release for customer-level ones) as
``SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(sigma)), steps)`` events and
recomputes both with dp-accounting's own accountants (PLD on a finer grid than the merchants
use, so an honest figure is never below it). A stated figure below the recomputed one, beyond
the tolerance, is flagged: the merchant under-reported its spend.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import dp_accounting
from dp_accounting import pld, rdp

from common.accounting import AccountantKind, MechanismStep, PrivacyUnit, merged, unbounded
from common.ledger import LedgerEntry
from common.ledger.claims import composition_history

TOLERANCE = 0.005  # epsilon; the merchant's PLD grid (1e-3) is pessimistic, so honest >= ours
AUDIT_PLD_GRID = 1e-4


@dataclass(frozen=True)
class Recomputed:
    """One entry's stated epsilons next to the independent recomputation."""

    merchant_id: str
    cohort: str  # the composition group: the cohort, or "*" for customer-level releases
    seq: int
    delta: float
    accountant: str
    recorded: float  # epsilon_after, by ``accountant``
    recorded_rdp: float
    pld: float
    rdp: float
    flags: tuple[str, ...]

    @property
    def recomputed(self) -> float:
        """The recomputed figure by the accountant the release named."""
        return self.pld if self.accountant == AccountantKind.PLD.value else self.rdp


def _event(step: MechanismStep) -> dp_accounting.DpEvent:
    gaussian = dp_accounting.GaussianDpEvent(step.noise_multiplier)
    sampled = dp_accounting.PoissonSampledDpEvent(step.sample_rate, gaussian)
    return dp_accounting.SelfComposedDpEvent(sampled, step.steps)


@functools.lru_cache(maxsize=4096)
def _pld(history: tuple[MechanismStep, ...], delta: float) -> float:
    if unbounded(history):
        return math.inf
    accountant = pld.PLDAccountant(value_discretization_interval=AUDIT_PLD_GRID)
    accountant.compose(dp_accounting.ComposedDpEvent([_event(s) for s in history]))
    return float(accountant.get_epsilon(delta))


@functools.lru_cache(maxsize=4096)
def _rdp(history: tuple[MechanismStep, ...], delta: float) -> float:
    if unbounded(history):
        return math.inf
    accountant = rdp.RdpAccountant()
    accountant.compose(dp_accounting.ComposedDpEvent([_event(s) for s in history]))
    return float(accountant.get_epsilon(delta))


def pld_epsilon(entries: Sequence[LedgerEntry], *, delta: float) -> float:
    """Tight epsilon of the composed history (dp-accounting PLD)."""
    return _pld(merged([e.release.mechanism_step for e in entries]), float(delta))


def _flags(entry: LedgerEntry, pld_eps: float, rdp_eps: float) -> tuple[str, ...]:
    release = entry.release
    recomputed = pld_eps if release.accountant is AccountantKind.PLD else rdp_eps
    flags = []
    if release.epsilon_after < recomputed - TOLERANCE:
        flags.append(
            f"recorded epsilon {release.epsilon_after:.4f} is below "
            f"{release.accountant.value.upper()} {recomputed:.4f}"
        )
    if release.epsilon_rdp < rdp_eps - TOLERANCE:
        flags.append(f"recorded RDP epsilon {release.epsilon_rdp:.4f} is below RDP {rdp_eps:.4f}")
    if release.epsilon_after > release.epsilon_cap:
        flags.append(
            f"recorded epsilon {release.epsilon_after:.4f} exceeds cap {release.epsilon_cap}"
        )
    return tuple(flags)


def recompute_chain(merchant_id: str, chain: Sequence[LedgerEntry]) -> list[Recomputed]:
    """Check each entry of one merchant's chain (in ledger order)."""
    out: list[Recomputed] = []
    for index, entry in enumerate(chain):
        release = entry.release
        earlier = composition_history(
            chain[:index], unit=release.privacy_unit, cohort=release.cohort
        )
        history = [*earlier, entry]
        steps = merged([e.release.mechanism_step for e in history])
        pld_eps, rdp_eps = _pld(steps, release.delta), _rdp(steps, release.delta)
        group = "*" if release.privacy_unit is PrivacyUnit.CUSTOMER else release.cohort
        out.append(
            Recomputed(
                merchant_id=merchant_id,
                cohort=group,
                seq=entry.seq,
                delta=release.delta,
                accountant=release.accountant.value,
                recorded=release.epsilon_after,
                recorded_rdp=release.epsilon_rdp,
                pld=pld_eps,
                rdp=rdp_eps,
                flags=_flags(entry, pld_eps, rdp_eps),
            )
        )
    return out


def recompute_all(
    chains: Mapping[str, Sequence[LedgerEntry]],
    *,
    on_merchant: Callable[[], None] | None = None,
) -> list[Recomputed]:
    """Every entry of every merchant, sorted by merchant, composition group and seq.
    ``on_merchant`` is called after each merchant (a progress display)."""
    rows: list[Recomputed] = []
    for merchant_id in sorted(chains):
        rows.extend(recompute_chain(merchant_id, list(chains[merchant_id])))
        if on_merchant is not None:
            on_merchant()
    return sorted(rows, key=lambda r: (r.merchant_id, r.cohort, r.seq))


def final_rows(results: Sequence[Recomputed]) -> list[Recomputed]:
    """The last entry of each merchant and composition group (what the summary table shows)."""
    last: dict[tuple[str, str], Recomputed] = {}
    for item in results:
        last[(item.merchant_id, item.cohort)] = item
    return [last[key] for key in sorted(last)]
