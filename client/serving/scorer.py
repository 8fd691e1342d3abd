"""Top-K over a merchant's whole catalogue with the next-basket model, on the evaluation's path.

A version's scorer is built at the merchant from

- the shared weights of a registry version (verified again from the merchant's mirror);
- the merchant's local part (``state_dir/nextbasket-local.npz``, fitted on its validation weeks
  when the federation evaluates on the test part, client/evaluation.py): its blend always, its
  personal weights only with the shared weights they were fitted from
  (:meth:`~common.nextbasket.local.LocalState.weights_for`);
- the merchant's own events (its data file and the inbox cohorts it accepted): each household's
  purchase features, the catalogue (every product it sold) and its sales per product.

Scoring is client/evaluation.py's, function for function: one case per household whose history
is its events before the scoring moment (:func:`~common.nextbasket.features.history_features`),
the scorer over the whole catalogue (:func:`client.nextbasket_local.model_scores`), then the blend
with ties broken by the merchant's sales (:func:`client.nextbasket_local.final_scores`). The top
K are the K highest final scores, equal ones in catalogue order (product id);
tests/test_serving_scorer.py checks the ranking against the evaluation path's scores. The score
reported with each product is the blended score, before tie breaking.

Scoring moment: the time of the newest event the merchant holds (its data clock), so features
describe each household as of the merchant's latest data; they are recomputed per request from
the snapshot of events loaded at the last refresh (client/serving/runtime.py reloads when the
data file or the accepted inbox cohorts change). An unknown customer is a case with no history
(the model's cold-start input): the non-personal ranking, the same for every new customer.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from client.evaluation import local_state_path
from client.merchant import MerchantConfig
from client.merchant_data import TRAINING_PERIOD, period_log
from client.nextbasket_local import HeldOut, final_scores, model_scores, scorer_model
from common.errors import CheckpointError
from common.nextbasket.baskets import BasketLog, CaseSet, catalogue
from common.nextbasket.features import (
    ProductCodes,
    history_features,
    merchant_popularity,
    product_codes,
)
from common.nextbasket.local import LocalState
from common.nextbasket.model import CatalogueGroups, catalogue_groups, catalogue_terms
from common.nextbasket.neighbours import NeighbourIndex
from common.nextbasket.spec import ScorerSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TopK:
    """The best ``k`` products for each customer, best first."""

    customer_ids: tuple[str, ...]
    products: np.ndarray  # [B, k] product ids
    scores: np.ndarray  # [B, k] blended scores
    known: np.ndarray  # [B] bool: False = no history at this merchant (cold start)


@dataclass(frozen=True)
class ServingEvents:
    """A snapshot of the merchant's events indexed for one scorer shape (shared by versions)."""

    log: BasketLog
    items: np.ndarray  # [products, 3] hashed ids
    catalogue: np.ndarray  # [C] product codes: every product sold, sorted by id
    popularity: np.ndarray  # [C] baskets containing each product, all customers
    day: float  # the scoring moment: the newest event, in days since 1970-01-01 UTC
    customer_codes: Mapping[str, int]
    codes: ProductCodes  # computed once per snapshot instead of once per request
    groups: CatalogueGroups  # the catalogue's category groups, once per snapshot
    product_ids: np.ndarray  # [C] product id of each catalogue position
    neighbours: NeighbourIndex  # every household's TIFU vector from all events, once per snapshot

    @classmethod
    def of(cls, events: pd.DataFrame, spec: ScorerSpec) -> ServingEvents:
        """Index ``events`` (one merchant's canonical events) as one period, the way the
        evaluation indexes a merchant's training events."""
        periods = period_log([events], spec)
        log = periods.log
        period = (TRAINING_PERIOD, TRAINING_PERIOD)
        shop = catalogue(log, period)
        popularity = merchant_popularity(log, before_week=TRAINING_PERIOD + 1)[shop]
        codes = {str(c): i for i, c in enumerate(log.customer_ids)}
        day = float(log.day.max())
        product = product_codes(log)
        groups = catalogue_groups(product.category, product.department, shop, periods.items)
        index = NeighbourIndex.build(log, before_day=np.nextafter(day, np.inf), catalogue=shop)
        return cls(
            log,
            periods.items,
            shop,
            popularity,
            day,
            codes,
            product,
            groups,
            log.product_ids[shop],
            index,
        )

    def cases(self, customer_ids: Sequence[str], at: float | None = None) -> CaseSet:
        """One case per customer: its events before ``at`` (days; default the data clock, which
        keeps every event) as history, nothing to predict. Unknown customers: no history."""
        log = self.log
        code = np.array([self.customer_codes.get(str(c), -1) for c in customer_ids], np.int64)
        found = code >= 0
        safe = np.where(found, code, 0)
        start = np.where(found, log.customer_start[safe], 0)
        end = np.where(found, log.customer_start[safe + 1], 0)
        if at is not None:  # a customer's events are in time order
            before = [
                np.searchsorted(log.day[s:e], at, side="left")
                for s, e in zip(start, end, strict=True)
            ]
            end = start + np.array(before, dtype=np.int64).reshape(-1)
        n = len(code)
        empty = np.zeros(0, np.int64)
        return CaseSet(
            merchant_id=log.merchant_id,
            customer=safe,
            day=np.full(n, self.day if at is None else at, dtype=np.float64),
            history_start=start.astype(np.int64),
            history_end=end.astype(np.int64),
            basket_indptr=np.zeros(n + 1, np.int64),
            basket_products=empty,
            basket_slot=empty,
            basket_repeat=np.zeros(0, bool),
            catalogue=self.catalogue,
        )

    def held_out(
        self, customer_ids: Sequence[str], at: float | None = None, *, neighbours: bool = False
    ) -> HeldOut:
        """What the production scoring functions take, for these customers; their neighbour
        scores too if asked (a blend with a neighbour weight needs them)."""
        cases = self.cases(customer_ids, at)
        features = history_features(self.log, cases, self.codes)
        scores = None
        if neighbours:
            index = self.neighbours
            if at is not None:  # the households' vectors as they were at that moment
                index = NeighbourIndex.build(self.log, before_day=at, catalogue=self.catalogue)
            scores = index.scores(cases)
        return HeldOut(cases, features, self.popularity, self.items, self.groups, scores)


class NextBasketScorer:
    """Ranks the merchant's catalogue for customers with one model version and its local part."""

    def __init__(
        self,
        version_id: int,
        spec: ScorerSpec,
        shared: Mapping[str, np.ndarray],
        local: LocalState,
        events: ServingEvents,
    ) -> None:
        self.version_id = version_id
        self.events = events
        self.head = local.head
        self._neighbours = local.head.neighbour_weight != 0  # computed per request only if used
        weights = local.weights_for(dict(shared))
        self.personal = weights is local.personal
        self._model = scorer_model(weights, spec)  # names and shapes checked here
        # fixed for this version and snapshot: computed once, not per request
        self._terms = catalogue_terms(self._model, events.catalogue, events.items, events.groups)

    def final_scores(
        self, customer_ids: Sequence[str], at: float | None = None
    ) -> tuple[np.ndarray, np.ndarray, HeldOut]:
        """([B, C] final scores that rank, [B, C] blended scores, the cases) for customers."""
        held = self.events.held_out(customer_ids, at, neighbours=self._neighbours)
        raw = model_scores(self._model, held, self._terms)
        blended = self.head.apply(raw, held.popularity, held.neighbours)
        return final_scores(raw, self.head, held), blended, held

    def top_k(self, customer_ids: Sequence[str], k: int, at: float | None = None) -> TopK:
        """The ``k`` best of :meth:`final_scores` without forming them: the final score orders
        by the blended score, then by the merchant's sales (break_ties), then catalogue order."""
        held = self.events.held_out(customer_ids, at, neighbours=self._neighbours)
        raw = model_scores(self._model, held, self._terms)
        blended = self.head.apply(raw, held.popularity, held.neighbours)
        index = best_k_by(blended, held.popularity, k)
        cases = held.cases
        return TopK(
            customer_ids=tuple(str(c) for c in customer_ids),
            products=self.events.product_ids[index],
            scores=np.take_along_axis(blended, index, axis=1),
            known=cases.history_end > cases.history_start,
        )


def best_k_by(scores: np.ndarray, tie: np.ndarray, k: int) -> np.ndarray:
    """Column indices of each row's ``k`` best by (score, then ``tie``, then lower index), best
    first: the head of the ranking by ``break_ties(scores, tie)`` (equal ones by index),
    without ranking the whole row."""
    rows, n = scores.shape
    k = min(k, n)
    index = np.empty((rows, k), dtype=np.int64)
    if k == 0:
        return index
    threshold = np.partition(scores, n - k, axis=1)[:, n - k]
    for row in range(rows):
        candidates = np.flatnonzero(scores[row] >= threshold[row])
        order = np.lexsort((candidates, -tie[candidates], -scores[row, candidates]))[:k]
        index[row] = candidates[order]
    return index


def load_local_state(merchant: MerchantConfig) -> LocalState:
    """The merchant's kept local part, or none (a missing or unreadable file: shared only)."""
    path = local_state_path(merchant)
    if not path.exists():
        return LocalState(merchant.id)
    try:
        return LocalState.load(path, merchant_id=merchant.id)
    except CheckpointError as exc:
        log.warning("serving without the local part: %s", exc.one_line())
        return LocalState(merchant.id)


def local_signature(merchant: MerchantConfig) -> tuple[int, int] | None:
    """(size, mtime) of the local part's file, or None: a change reloads it."""
    try:
        info = local_state_path(merchant).stat()
    except FileNotFoundError:
        return None
    return info.st_size, info.st_mtime_ns
