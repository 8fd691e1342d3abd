"""The shared recommendation model: hashed embeddings + an MLP scorer.

Built only from ``nn.Embedding`` and ``nn.Linear`` (no EmbeddingBag, no tied weights) so that
Opacus ghost clipping computes per-record gradient norms without materialising per-sample
gradients of the embedding tables. Product, category and department ids are hashed into fixed
vocabularies, so every merchant's model has the same shape and parameter names and FedAvg
aligns them without sharing catalogues.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from torch import nn

from common.model_spec import ModelSpec

__all__ = ["ModelSpec", "Recommender", "arrays_sha256", "load_state_arrays", "state_arrays"]

from common.arrays_io import arrays_sha256


class Recommender(nn.Module):
    """Scores candidate products for a customer given the customer's recent purchases.

    Inputs per record (``G`` events grouped in one privacy record, ``C`` candidates each):
    ``history`` [B, G, L] hashed product ids (0 = padding), ``items``/``categories``/
    ``departments`` [B, G, C]. Output: logits [B, G, C].
    """

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        d = spec.embedding_dim
        self.history_items = nn.Embedding(spec.product_buckets, d)
        self.items = nn.Embedding(spec.product_buckets, d)
        self.item_bias = nn.Embedding(spec.product_buckets, 1)
        self.categories = nn.Embedding(spec.category_buckets, d)
        self.departments = nn.Embedding(spec.department_buckets, d)
        self.user = nn.Linear(d, d)
        self.hidden = nn.Linear(3 * d + 2, spec.hidden_dim)
        self.out = nn.Linear(spec.hidden_dim, 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for table in (self.history_items, self.items, self.categories, self.departments):
            nn.init.normal_(table.weight, std=0.05)
        nn.init.zeros_(self.item_bias.weight)

    def forward(
        self,
        history: torch.Tensor,
        items: torch.Tensor,
        categories: torch.Tensor,
        departments: torch.Tensor,
    ) -> torch.Tensor:
        batch, groups, length = history.shape
        candidates = items.shape[-1]
        mask = (history > 0).to(torch.float32)  # [B, G, L]
        hist = self.history_items(history.reshape(batch, groups * length))
        hist = hist.reshape(batch, groups, length, -1)
        pooled = (hist * mask.unsqueeze(-1)).sum(2) / mask.sum(2, keepdim=True).clamp(min=1.0)
        user = torch.tanh(self.user(pooled))  # [B, G, d]

        flat = (batch, groups * candidates)
        item_vec = (
            self.items(items.reshape(flat))
            + self.categories(categories.reshape(flat))
            + self.departments(departments.reshape(flat))
        ).reshape(batch, groups, candidates, -1)
        bias = self.item_bias(items.reshape(flat)).reshape(batch, groups, candidates)

        repeats = (history.unsqueeze(2) == items.unsqueeze(3)).to(torch.float32).sum(-1)
        user_b = user.unsqueeze(2).expand_as(item_vec)
        features = torch.cat(
            [
                user_b,
                item_vec,
                user_b * item_vec,
                torch.log1p(repeats).unsqueeze(-1),
                (repeats > 0).to(torch.float32).unsqueeze(-1),
            ],
            dim=-1,
        ).reshape(batch, groups * candidates, -1)
        hidden = torch.relu(self.hidden(features))
        logits = self.out(hidden).reshape(batch, groups, candidates)
        return logits + bias


def state_arrays(model: nn.Module) -> OrderedDict[str, np.ndarray]:
    """Plain float32 arrays keyed by parameter name, free of any Opacus ``_module.`` prefix."""
    arrays: OrderedDict[str, np.ndarray] = OrderedDict()
    for name, tensor in model.state_dict().items():
        clean = name.removeprefix("_module.")
        arrays[clean] = tensor.detach().cpu().numpy().astype(np.float32, copy=True)
    return arrays


def load_state_arrays(model: nn.Module, arrays: dict[str, np.ndarray]) -> None:
    """Load plain arrays into ``model``; names and shapes must match exactly."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if set(arrays) != set(expected):
        missing = sorted(set(expected) - set(arrays))
        extra = sorted(set(arrays) - set(expected))
        raise ValueError(f"model arrays do not match: missing {missing}, unexpected {extra}")
    for name, shape in expected.items():
        if tuple(arrays[name].shape) != tuple(shape):
            raise ValueError(
                f"array {name!r} has shape {arrays[name].shape}, expected {tuple(shape)}"
            )
    model.load_state_dict(
        {k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in arrays.items()}
    )
