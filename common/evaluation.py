"""Ranking metrics against sampled candidates (protocol in docs/evaluation.md).

Each case puts the purchased product at candidate index 0. Ties count against the model
(a tied negative ranks above the positive) for HR/NDCG, and as one half for AUC, so a
constant scorer gets AUC 0.5 and no credit for lucky ordering.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from common.features import RecordTensors

METRICS = ("auc", "hr@10", "ndcg@10")


def per_case_metrics(scores: np.ndarray, *, k: int = 10) -> dict[str, np.ndarray]:
    """Each case's AUC, HR@k and NDCG@k; ``scores`` [cases, candidates], positive in column 0."""
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise ValueError(f"scores must be [cases, candidates>=2], got shape {scores.shape}")
    positive = scores[:, :1]
    negatives = scores[:, 1:]
    above = (negatives > positive).sum(1)
    ties = (negatives == positive).sum(1)
    auc = 1.0 - (above + 0.5 * ties) / negatives.shape[1]
    rank = above + ties  # 0-based, pessimistic
    hit = rank < k
    ndcg = np.where(hit, 1.0 / np.log2(rank + 2.0), 0.0)
    return {"auc": auc, f"hr@{k}": hit.astype(np.float64), f"ndcg@{k}": ndcg}


def ranking_metrics(scores: np.ndarray, *, k: int = 10) -> dict[str, float]:
    """Mean of :func:`per_case_metrics` (NaN without cases)."""
    per_case = per_case_metrics(scores, k=k)
    if len(scores) == 0:
        return {name: float("nan") for name in per_case}
    return {name: float(values.mean()) for name, values in per_case.items()}


@torch.no_grad()
def model_scores(
    model: torch.nn.Module, records: RecordTensors, *, batch_size: int = 1024
) -> np.ndarray:
    """Scores [cases, candidates] for single-event evaluation records."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(records), batch_size):
        part = [t[start : start + batch_size].to(device) for t in records.tensors()[:4]]
        out.append(model(*part)[:, 0, :].float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, records.items.shape[-1]))


def evaluate_scorer(
    scorer: Callable[[RecordTensors], np.ndarray], records: RecordTensors
) -> dict[str, float]:
    return ranking_metrics(scorer(records))


def popularity_scorer(counts: dict[int, int]) -> Callable[[RecordTensors], np.ndarray]:
    """The most-popular baseline: score = how often the merchant sold the product in training."""

    def score(records: RecordTensors) -> np.ndarray:
        items = records.items[:, 0, :].numpy()
        lookup = np.vectorize(lambda item: counts.get(int(item), 0), otypes=[np.float64])
        return lookup(items) if items.size else np.zeros(items.shape)

    return score
