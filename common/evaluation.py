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


def ranking_metrics(scores: np.ndarray, *, k: int = 10) -> dict[str, float]:
    """``scores`` [cases, candidates], positive in column 0."""
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise ValueError(f"scores must be [cases, candidates>=2], got shape {scores.shape}")
    if len(scores) == 0:
        return {"auc": float("nan"), f"hr@{k}": float("nan"), f"ndcg@{k}": float("nan")}
    positive = scores[:, :1]
    negatives = scores[:, 1:]
    above = (negatives > positive).sum(1)
    ties = (negatives == positive).sum(1)
    auc = 1.0 - (above + 0.5 * ties) / negatives.shape[1]
    rank = above + ties  # 0-based, pessimistic
    hit = rank < k
    ndcg = np.where(hit, 1.0 / np.log2(rank + 2.0), 0.0)
    return {"auc": float(auc.mean()), f"hr@{k}": float(hit.mean()), f"ndcg@{k}": float(ndcg.mean())}


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
