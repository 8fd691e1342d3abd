"""The merchant's neighbour scores: TIFU-KNN over its own households, for the local blend.

The shared model learns from one household's records at a time (what DP-SGD's per-record
bound needs), so it never sees what similar households at the same merchant bought next.
TIFU-KNN (Hu et al., SIGIR 2020) does: a household's time-decayed basket vector
(:func:`common.nextbasket.baselines.tifu_vectors`) blended with the mean vector of its nearest
households. The merchant computes it from its own events at scoring time and adds it to its
blend with a weight chosen on its validation weeks (:class:`common.nextbasket.local.LocalHead`);
nothing of it leaves the merchant, so it costs no privacy towards the platform.

The household vectors are sparse (a household buys a few hundred of the catalogue's products),
so the index holds them as a CSR matrix: memory grows with the events, not with households x
catalogue. Evaluation and serving score through the same :meth:`NeighbourIndex.scores`, so the
served ranking equals the measured one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import sparse

from common.nextbasket.baselines import TifuParams, tifu_decay_weights
from common.nextbasket.baskets import BasketLog, CaseSet, catalogue_positions

# Fixed, not tuned per merchant: tuning TIFU-KNN's grid costs minutes per store, and the
# blend weight chosen on validation already sets how much the term counts.
NEIGHBOUR_PARAMS = TifuParams()


@dataclass(frozen=True)
class NeighbourIndex:
    """Every household's TIFU vector from the baskets before one cutoff, over one catalogue."""

    vectors: sparse.csr_matrix  # [customers, catalogue]
    active: np.ndarray  # [A] customer codes with at least one basket before the cutoff
    pool: sparse.csr_matrix  # [A, catalogue] their vectors
    pool_norms: np.ndarray  # [A] squared norms
    params: TifuParams

    @classmethod
    def build(
        cls,
        log: BasketLog,
        *,
        before_day: float,
        catalogue: np.ndarray,
        params: TifuParams = NEIGHBOUR_PARAMS,
    ) -> NeighbourIndex:
        kept, weight = tifu_decay_weights(log, before_day=before_day, params=params)
        slot, inside = catalogue_positions(catalogue, log.product[kept])
        vectors = sparse.csr_matrix(
            (weight[inside], (log.customer[kept][inside], slot[inside])),
            shape=(log.n_customers, len(catalogue)),
            dtype=np.float64,
        )  # duplicate (customer, product) entries are summed
        active = np.flatnonzero(np.diff(vectors.indptr) > 0)
        pool = vectors[active]
        norms = np.asarray(pool.multiply(pool).sum(axis=1)).reshape(-1)
        return cls(vectors, active, pool, norms, params)

    def scores(self, cases: CaseSet, *, batch_cases: int = 256) -> np.ndarray:
        """[cases, catalogue] TIFU-KNN scores divided by each case's largest (0 where all are 0).

        A case without history before the cutoff has a zero vector of its own and gets the
        mean of the smallest households' vectors, as TIFU-KNN defines it; a household is never
        its own neighbour. Dense work is done ``batch_cases`` at a time, so memory beyond the
        result does not grow with the number of cases."""
        has = cases.history_end > cases.history_start
        code = np.where(has, cases.customer, -1)
        out = np.zeros((len(cases), self.vectors.shape[1]), dtype=np.float32)
        for start in range(0, len(cases), batch_cases):
            rows = slice(start, min(start + batch_cases, len(cases)))
            out[rows] = self._blend(code[rows])
        return out

    def _blend(self, code: np.ndarray) -> np.ndarray:
        own = np.zeros((len(code), self.vectors.shape[1]))
        known = code >= 0
        if known.any():
            own[known] = self.vectors[code[known]].toarray()
        if len(self.active) == 0:
            blended = self.params.alpha * own
        else:
            squared = (own**2).sum(1)[:, None] + self.pool_norms[None, :]
            squared = squared - 2.0 * np.asarray(self.pool @ own.T).T
            squared[self.active[None, :] == code[:, None]] = np.inf
            k = min(self.params.neighbours, max(len(self.active) - 1, 1))
            order = np.argsort(squared, axis=1, kind="stable")[:, :k]
            # the mean of each case's k nearest vectors, as one sparse product
            pick = sparse.csr_matrix(
                (np.full(order.size, 1.0 / k), (np.repeat(np.arange(len(code)), k), order.ravel())),
                shape=(len(code), len(self.active)),
            )
            nearest = (pick @ self.pool).toarray()
            blended = self.params.alpha * own + (1 - self.params.alpha) * nearest
        top = blended.max(axis=1, keepdims=True) if blended.shape[1] else blended[:, :1]
        return blended / np.where(top > 0, top, 1.0)
