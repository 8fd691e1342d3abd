"""Held-out evaluation cases the platform scores the global model on.

Stored as a plain NumPy archive (history, candidates, and the merchant each case came from),
so the server never needs the merchants' raw events.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.atomic import atomic_write_bytes
from common.evaluation import model_scores, ranking_metrics
from common.features import RecordTensors


@dataclass(frozen=True)
class EvaluationSet:
    records: RecordTensors
    merchant_index: np.ndarray  # [cases] index into merchants
    merchants: tuple[str, ...]

    def save(self, path: Path) -> None:
        buffer = io.BytesIO()
        np.savez(
            buffer,
            history=self.records.history.numpy().astype(np.int32),
            items=self.records.items.numpy().astype(np.int32),
            categories=self.records.categories.numpy().astype(np.int32),
            departments=self.records.departments.numpy().astype(np.int32),
            merchant_index=self.merchant_index,
            merchants=np.array(self.merchants, dtype=np.str_),
        )
        atomic_write_bytes(path, buffer.getvalue())

    @classmethod
    def load(cls, path: Path) -> EvaluationSet:
        with np.load(path, allow_pickle=False) as data:

            def ids(key: str) -> torch.Tensor:
                return torch.from_numpy(data[key].astype(np.int64))

            history = ids("history")
            records = RecordTensors(
                history=history,
                items=ids("items"),
                categories=ids("categories"),
                departments=ids("departments"),
                mask=torch.ones(history.shape[:2], dtype=torch.float32),
            )
            return cls(records, data["merchant_index"], tuple(str(m) for m in data["merchants"]))

    @classmethod
    def concatenate(cls, parts: list[tuple[str, RecordTensors]]) -> EvaluationSet:
        tensors = [torch.cat([p.tensors()[i] for _, p in parts]) for i in range(5)]
        index = np.concatenate(
            [np.full(len(p), i, dtype=np.int64) for i, (_, p) in enumerate(parts)]
        )
        return cls(RecordTensors(*tensors), index, tuple(name for name, _ in parts))

    def evaluate(
        self, model: torch.nn.Module
    ) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
        """Overall metrics and metrics per merchant."""
        scores = model_scores(model, self.records)
        return self.metrics_of(scores)

    def metrics_of(
        self, scores: np.ndarray
    ) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
        per_merchant = {
            name: ranking_metrics(scores[self.merchant_index == i])
            for i, name in enumerate(self.merchants)
            if (self.merchant_index == i).any()
        }
        return ranking_metrics(scores), per_merchant
