"""A merchant's local part of the next-basket model: fitted and used at the merchant only.

After the federation has trained the shared weights, each merchant chooses on its own
validation weeks (the weeks after its training weeks) between

- the shared weights as they are, or Ditto-personalised copies at a few pull strengths
  (:func:`client.nextbasket_training.personalise`, trained without DP on its own records), and
- a popularity weight and a neighbour weight (TIFU-KNN over its own households,
  :mod:`common.nextbasket.neighbours`) for its blend (:class:`common.nextbasket.local.LocalHead`),

keeping whichever scores the best NDCG@10 there (the simpler choice wins ties). Nothing of
this is sent: the platform only ever receives shared weights and metric sums.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from client.nextbasket_training import personalise
from client.training import LocalTraining
from common.arrays_io import arrays_sha256
from common.nextbasket.baselines import break_ties
from common.nextbasket.baskets import CaseSet
from common.nextbasket.features import HistoryFeatures
from common.nextbasket.local import LocalHead, LocalState
from common.nextbasket.metrics import MetricSums, case_metrics
from common.nextbasket.model import (
    BasketScorer,
    CatalogueGroups,
    CatalogueTerms,
    RecordTensors,
    load_shared_arrays,
    score_catalogue,
)
from common.nextbasket.spec import ScorerSpec

POPULARITY_WEIGHTS: tuple[float, ...] = (0.0, 0.1, 0.25, 0.5, 1.0)
NEIGHBOUR_WEIGHTS: tuple[float, ...] = (0.0, 1.0, 2.0, 4.0, 8.0, 16.0)
PROX_STRENGTHS: tuple[float, ...] = (1.0, 0.1)
PERSONAL_TRAINING = LocalTraining(batch_size=256, local_epochs=2, learning_rate=3e-3)


@dataclass(frozen=True)
class HeldOut:
    """One merchant's held-out cases with what scoring them needs."""

    cases: CaseSet
    features: HistoryFeatures
    popularity: np.ndarray  # [catalogue] merchant sales before the held-out weeks
    items: np.ndarray  # [products, 3] hashed ids (records.item_ids)
    groups: CatalogueGroups | None = None  # of cases.catalogue, when the caller keeps them
    neighbours: np.ndarray | None = None  # [cases, catalogue] NeighbourIndex.scores, if kept


def scorer_model(arrays: dict[str, np.ndarray], spec: ScorerSpec) -> BasketScorer:
    """A scorer holding the weights ``arrays`` (shared or personal); names and shapes must fit."""
    model = BasketScorer(spec)
    load_shared_arrays(model, arrays)
    return model.eval()


def model_scores(
    model: BasketScorer, data: HeldOut, terms: CatalogueTerms | None = None
) -> np.ndarray:
    """[cases, catalogue] scores of a loaded scorer (serving keeps one per version, with its
    ``terms`` for the catalogue of ``data``)."""
    return score_catalogue(
        model, data.features, data.cases, data.items, groups=data.groups, terms=terms
    )


def raw_scores(arrays: dict[str, np.ndarray], spec: ScorerSpec, data: HeldOut) -> np.ndarray:
    """[cases, catalogue] scores of the weights ``arrays`` (shared or personal)."""
    return model_scores(scorer_model(arrays, spec), data)


def final_scores(raw: np.ndarray, head: LocalHead, data: HeldOut) -> np.ndarray:
    """The blend, ties broken by the merchant's popularity (as every baseline does)."""
    return break_ties(head.apply(raw, data.popularity, data.neighbours), data.popularity)


def scores_with(
    state: LocalState, shared: dict[str, np.ndarray], spec: ScorerSpec, data: HeldOut
) -> np.ndarray:
    """What the merchant serves: its personal weights if they were fitted from ``shared``,
    else ``shared``, then its blend."""
    return final_scores(raw_scores(state.weights_for(shared), spec, data), state.head, data)


def _best_head(raw: np.ndarray, data: HeldOut) -> tuple[LocalHead, float]:
    best, best_value = LocalHead(0.0), -np.inf
    for neighbour in NEIGHBOUR_WEIGHTS if data.neighbours is not None else (0.0,):
        for weight in POPULARITY_WEIGHTS:
            head = LocalHead(weight, neighbour)
            value = MetricSums.of(case_metrics(final_scores(raw, head, data), data.cases))
            if value.mean("ndcg@10") > best_value + 1e-12:
                best, best_value = head, value.mean("ndcg@10")
    return best, best_value


def fit_local_state(
    *,
    merchant_id: str,
    shared: dict[str, np.ndarray],
    spec: ScorerSpec,
    records: RecordTensors | None,
    validation: HeldOut,
    generator: torch.Generator,
) -> LocalState:
    """Choose the local part on the validation cases; ``records`` None = no personalisation
    (only the blend is chosen)."""
    base = arrays_sha256(shared)
    head, value = _best_head(raw_scores(shared, spec, validation), validation)
    state = LocalState(merchant_id, head, shared_sha256=base)
    if records is None:
        return state
    for prox in PROX_STRENGTHS:
        model = BasketScorer(spec)
        load_shared_arrays(model, shared)
        personal = personalise(
            model=model,
            records=records,
            settings=PERSONAL_TRAINING,
            prox=prox,
            generator=generator,
        )
        candidate_head, candidate = _best_head(raw_scores(personal, spec, validation), validation)
        if candidate > value + 1e-12:
            state = LocalState(merchant_id, candidate_head, prox, personal, shared_sha256=base)
            value = candidate
    return state
