"""Turn canonical merchant events into model inputs.

A customer is represented only by their own earlier purchases (the last ``history_length``
products bought strictly before the event's timestamp, so items of the same basket never see
each other). Nothing computed here mixes different customers' data, which keeps each training
record's content a function of one customer's events (see docs/privacy.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from common.accounting import PrivacyUnit
from common.hashing import stable_hash
from common.model import ModelSpec


@dataclass(frozen=True)
class Catalog:
    """The merchant's products (hashed), the pool negatives and candidates are drawn from."""

    items: np.ndarray
    categories: np.ndarray
    departments: np.ndarray

    def __len__(self) -> int:
        return len(self.items)


@dataclass(frozen=True)
class EncodedEvents:
    """One row per event: the hashed product and the customer's hashed history before it."""

    history: np.ndarray  # [N, L] int64
    item: np.ndarray  # [N]
    category: np.ndarray
    department: np.ndarray
    customer: np.ndarray  # [N] int64 codes, local to this encoding

    def __len__(self) -> int:
        return len(self.item)


def _hashed_columns(frame: pd.DataFrame, spec: ModelSpec) -> tuple[np.ndarray, ...]:
    return (
        stable_hash(frame["product_id"], spec.product_buckets),
        stable_hash(frame["category"], spec.category_buckets),
        stable_hash(frame["department"], spec.department_buckets),
    )


def build_catalog(events: pd.DataFrame, spec: ModelSpec) -> Catalog:
    products = events.drop_duplicates("product_id").sort_values("product_id")
    items, categories, departments = _hashed_columns(products, spec)
    return Catalog(items=items, categories=categories, departments=departments)


def encode_events(
    events: pd.DataFrame, spec: ModelSpec, *, context: pd.DataFrame | None = None
) -> EncodedEvents:
    """Encode ``events``; ``context`` (earlier events of the same merchant) feeds histories only."""
    target = events.assign(_target=True)
    frames = [target] if context is None else [context.assign(_target=False), target]
    full = pd.concat(frames, ignore_index=True)
    full = full.sort_values(["customer_id", "timestamp"], kind="stable").reset_index(drop=True)
    items, categories, departments = _hashed_columns(full, spec)
    customer = pd.factorize(full["customer_id"])[0].astype(np.int64)
    n = len(full)
    position = np.arange(n)
    new_customer = np.r_[True, customer[1:] != customer[:-1]]
    customer_start = np.maximum.accumulate(np.where(new_customer, position, 0))
    ts = full["timestamp"].to_numpy()
    new_basket = new_customer | np.r_[True, ts[1:] != ts[:-1]]
    basket_start = np.maximum.accumulate(np.where(new_basket, position, 0))
    offsets = np.arange(1, spec.history_length + 1)
    index = basket_start[:, None] - offsets[None, :]
    valid = index >= customer_start[:, None]
    history = np.where(valid, items[np.clip(index, 0, None)], 0)
    keep = full["_target"].to_numpy(dtype=bool)
    return EncodedEvents(
        history=history[keep],
        item=items[keep],
        category=categories[keep],
        department=departments[keep],
        customer=customer[keep],
    )


@dataclass(frozen=True)
class RecordTensors:
    """Model inputs grouped into privacy records: [N, G, ...] with a validity mask [N, G]."""

    history: torch.Tensor
    items: torch.Tensor
    categories: torch.Tensor
    departments: torch.Tensor
    mask: torch.Tensor

    def __len__(self) -> int:
        return int(self.history.shape[0])

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.history, self.items, self.categories, self.departments, self.mask)


def _candidates(
    encoded: EncodedEvents, rows: np.ndarray, catalog: Catalog, negatives: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Positive first, then the sampled negatives (indices into ``catalog``)."""
    items = np.concatenate([encoded.item[rows, None], catalog.items[negatives]], axis=-1)
    cats = np.concatenate([encoded.category[rows, None], catalog.categories[negatives]], axis=-1)
    deps = np.concatenate([encoded.department[rows, None], catalog.departments[negatives]], axis=-1)
    return items, cats, deps


def _customer_groups(
    encoded: EncodedEvents, events_per_customer: int, rng: np.random.Generator
) -> np.ndarray:
    """[customers, G] event rows (-1 = empty): up to G events per customer, drawn at random."""
    order = np.lexsort((rng.random(len(encoded)), encoded.customer))
    customers = encoded.customer[order]
    starts = np.r_[0, np.flatnonzero(customers[1:] != customers[:-1]) + 1]
    counts = np.diff(np.r_[starts, len(order)])
    slot = np.arange(len(order)) - np.repeat(starts, counts)
    groups = np.full((len(starts), events_per_customer), -1, dtype=np.int64)
    keep = slot < events_per_customer
    owner = np.repeat(np.arange(len(starts)), counts)
    groups[owner[keep], slot[keep]] = order[keep]
    return groups


def training_records(
    encoded: EncodedEvents,
    catalog: Catalog,
    *,
    unit: PrivacyUnit,
    negatives: int,
    events_per_customer: int,
    rng: np.random.Generator,
) -> RecordTensors:
    """One record per event (event-level) or per customer with at most G events (customer-level)."""
    if unit is PrivacyUnit.EVENT:
        groups = np.arange(len(encoded), dtype=np.int64)[:, None]
    else:
        groups = _customer_groups(encoded, events_per_customer, rng)
    mask = groups >= 0
    rows = np.where(mask, groups, 0)
    sampled = rng.integers(0, len(catalog), size=(*rows.shape, negatives))
    items, cats, deps = _candidates(encoded, rows, catalog, sampled)
    return RecordTensors(
        history=torch.from_numpy(encoded.history[rows]),
        items=torch.from_numpy(items),
        categories=torch.from_numpy(cats),
        departments=torch.from_numpy(deps),
        mask=torch.from_numpy(mask.astype(np.float32)),
    )


def evaluation_records(
    encoded: EncodedEvents,
    catalog: Catalog,
    *,
    candidates: int,
    max_cases: int,
    rng: np.random.Generator,
) -> RecordTensors:
    """Fixed evaluation cases: the true product first, then ``candidates - 1`` catalog negatives
    that differ from it, for at most ``max_cases`` events drawn without replacement."""
    n = len(encoded)
    rows = np.sort(rng.choice(n, size=min(n, max_cases), replace=False)) if n else np.zeros(0, int)
    sampled = rng.integers(0, len(catalog), size=(len(rows), candidates - 1))
    clash = catalog.items[sampled] == encoded.item[rows, None]
    while clash.any():
        sampled[clash] = rng.integers(0, len(catalog), size=int(clash.sum()))
        clash = catalog.items[sampled] == encoded.item[rows, None]
    items, cats, deps = _candidates(encoded, rows, catalog, sampled)
    return RecordTensors(
        history=torch.from_numpy(encoded.history[rows][:, None, :]),
        items=torch.from_numpy(items[:, None, :]),
        categories=torch.from_numpy(cats[:, None, :]),
        departments=torch.from_numpy(deps[:, None, :]),
        mask=torch.ones((len(rows), 1), dtype=torch.float32),
    )
