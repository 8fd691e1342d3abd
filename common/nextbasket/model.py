"""The next-basket scorer: a shared part the federation trains with DP, a local part that stays.

**Shared part** (:class:`BasketScorer`, the only weights that ever leave a merchant, as plain
float32 arrays). For a household ``h`` at scoring time and a product ``i``::

    score(h, i) = product_bias[i]                                        # cross-merchant prior
                + explore_mlp(household(h), affinity(h, i), cat[i], dept[i])
                + in_history(h, i) * repeat_mlp(all features(h, i), cat[i], dept[i])

The explore part ranks products the household never bought from what is shared across
merchants: a hashed product prior, category and department embeddings, and the household's
own category/department shares. The repeat part lifts products from the household's history
by its own frequency, time decay, recency and repurchase rhythm; its household inputs
(baskets, repeat ratio, days since the last visit) learn how far to trust the repeat part
against the explore part. About 43 k parameters, most of them the product prior.

Only plain ``nn.Embedding`` and ``nn.Linear`` layers hold weights, each is called once per
forward, and every input is ``[records, candidates, ...]``: what one-pass per-record clipping
(client/clipped_gradients.py) needs, and what Opacus' ghost clipping needs as well.

**DP soundness** (the contract of training with :class:`BasketSoftmaxLoss`): a record's loss
depends only on that record's data (records.py), the current shared weights, and public
inputs (catalogue, product metadata). Merchant-wide statistics never enter it. The local part
(:class:`common.nextbasket.local.LocalState`: a blend and personalised weights) is fitted
after, from the shared weights and local data, and never feeds back into the shared update:
the coupling is one-way.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from common.errors import ConfigError
from common.nextbasket.baskets import CaseSet, catalogue_positions
from common.nextbasket.features import REPEAT_FEATURES, HistoryFeatures
from common.nextbasket.records import NEGATIVE, POSITIVE, RecordArrays
from common.nextbasket.spec import ScorerSpec

_MASKED = -1.0e4  # finite, so that an all-masked softmax has zero (not NaN) gradients


class BasketScorer(nn.Module):
    """Scores candidates: ``features`` [B, T, F] float, ``items`` [B, T, 3] hashed ids."""

    def __init__(self, spec: ScorerSpec) -> None:
        super().__init__()
        self.spec = spec
        d, h = spec.embedding_dim, spec.hidden_dim
        context = spec.features - len(REPEAT_FEATURES)
        self.product_bias = nn.Embedding(spec.product_buckets, 1)
        self.categories = nn.Embedding(spec.category_buckets, d)
        self.departments = nn.Embedding(spec.department_buckets, d)
        self.explore_hidden = nn.Linear(context + 2 * d, h)
        self.explore_out = nn.Linear(h, 1)
        self.repeat_hidden = nn.Linear(spec.features + 2 * d, h)
        self.repeat_out = nn.Linear(h, 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.product_bias.weight)
        nn.init.normal_(self.categories.weight, std=0.05)
        nn.init.normal_(self.departments.weight, std=0.05)

    def forward(self, features: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        category = self.categories(items[..., 1])
        department = self.departments(items[..., 2])
        bias = self.product_bias(items[..., 0]).squeeze(-1)
        context = features[..., len(REPEAT_FEATURES) :]
        explore = self.explore_term(context, category, department)
        repeat = self.repeat_term(features, category, department)
        return bias + explore + features[..., 0] * repeat

    def explore_term(
        self, context: torch.Tensor, category: torch.Tensor, department: torch.Tensor
    ) -> torch.Tensor:
        """The explore MLP on household context and embedded category/department: [..., 1]."""
        hidden = torch.relu(self.explore_hidden(torch.cat([context, category, department], -1)))
        return self.explore_out(hidden).squeeze(-1)

    def repeat_term(
        self, features: torch.Tensor, category: torch.Tensor, department: torch.Tensor
    ) -> torch.Tensor:
        """The repeat MLP on every feature and embedded category/department (before the
        ``in_history`` factor)."""
        hidden = torch.relu(self.repeat_hidden(torch.cat([features, category, department], -1)))
        return self.repeat_out(hidden).squeeze(-1)


class BasketSoftmaxLoss(nn.Module):
    """Sampled softmax over the catalogue, one term per positive, mean per basket, mean over
    the record's baskets.

    For a positive ``p`` of a basket with negatives ``n`` (logits corrected by ``log_q``):
    ``softplus(logsumexp_n(s_n + log_q_n) - s_p)`` = -log of p's share against the negatives.
    ``reduction = "none"`` gives the per-record losses that DP-SGD clips one by one.
    """

    def __init__(self) -> None:
        super().__init__()
        self.reduction = "mean"

    def forward(
        self, logits: torch.Tensor, log_q: torch.Tensor, target: torch.Tensor
    ) -> torch.Tensor:
        scores = logits.reshape(target.shape)
        positive = (target == POSITIVE).to(scores.dtype)
        negative = target == NEGATIVE
        masked = torch.where(negative, scores + log_q, torch.full_like(scores, _MASKED))
        partition = torch.logsumexp(masked, dim=-1, keepdim=True)
        per_positive = nn.functional.softplus(partition - scores) * positive
        counts = positive.sum(-1)
        per_basket = per_positive.sum(-1) / counts.clamp(min=1.0)
        valid = (counts > 0).to(scores.dtype)
        per_record = (per_basket * valid).sum(-1) / valid.sum(-1).clamp(min=1.0)
        if self.reduction == "none":
            return per_record
        return per_record.sum() if self.reduction == "sum" else per_record.mean()


@dataclass(frozen=True)
class RecordTensors:
    """:class:`RecordArrays` as tensors, candidates flattened to ``[N, G * C, ...]``."""

    features: torch.Tensor
    items: torch.Tensor
    log_q: torch.Tensor
    target: torch.Tensor

    @classmethod
    def of(cls, records: RecordArrays) -> RecordTensors:
        n, g, c, f = records.features.shape
        return cls(
            features=torch.from_numpy(records.features.reshape(n, g * c, f)),
            items=torch.from_numpy(records.items.reshape(n, g * c, 3)),
            log_q=torch.from_numpy(records.log_q),
            target=torch.from_numpy(records.target.astype(np.int64)),
        )

    def __len__(self) -> int:
        return int(self.features.shape[0])

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.features, self.items, self.log_q, self.target)


def shared_arrays(model: nn.Module) -> OrderedDict[str, np.ndarray]:
    """The shared weights as plain float32 arrays, free of any Opacus ``_module.`` prefix."""
    arrays: OrderedDict[str, np.ndarray] = OrderedDict()
    for name, tensor in model.state_dict().items():
        arrays[name.removeprefix("_module.")] = (
            tensor.detach().cpu().numpy().astype(np.float32, copy=True)
        )
    return arrays


def load_shared_arrays(model: nn.Module, arrays: dict[str, np.ndarray]) -> None:
    """Load plain arrays into ``model``; names and shapes must match exactly."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if set(arrays) != set(expected):
        raise ConfigError(
            f"scorer arrays do not match: missing {sorted(set(expected) - set(arrays))}, "
            f"unexpected {sorted(set(arrays) - set(expected))}"
        )
    for name, shape in expected.items():
        if tuple(arrays[name].shape) != shape:
            raise ConfigError(f"array {name!r} has shape {arrays[name].shape}, expected {shape}")
    model.load_state_dict(
        {k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in arrays.items()}
    )


@dataclass(frozen=True)
class CatalogueGroups:
    """A catalogue's products grouped by everything the explore term sees of a product: its
    category and department (local codes for the household's shares, hashed ids for the
    embeddings). Products of one group get the same explore term for a household."""

    group: np.ndarray  # [C] the group of each catalogue position
    category: np.ndarray  # [G] local category code
    department: np.ndarray  # [G] local department code
    items: np.ndarray  # [G, 2] hashed (category, department) ids


def catalogue_groups(
    product_category: np.ndarray,
    product_department: np.ndarray,
    catalogue: np.ndarray,
    items: np.ndarray,
) -> CatalogueGroups:
    """Groups of ``catalogue`` (product codes) by local category/department codes (as in
    :class:`HistoryFeatures`) and hashed ids (``items``, :func:`records.item_ids`); a caller
    that scores the same catalogue many times computes them once."""
    columns = np.stack(
        [
            product_category[catalogue],
            product_department[catalogue],
            items[catalogue, 1],
            items[catalogue, 2],
        ],
        axis=1,
    ).astype(np.int64)
    if len(catalogue) == 0:
        keys, first, group = columns[:0, 0], columns[:0, 0], columns[:0, 0]
    else:
        radix = columns.max(axis=0) + 1
        if float(np.prod(radix.astype(np.float64))) < 2.0**62:
            key = columns[:, 0]
            for j in range(1, 4):
                key = key * radix[j] + columns[:, j]
            keys, first, group = np.unique(key, return_index=True, return_inverse=True)
        else:  # not reached with realistic bucket counts; same grouping, slower
            keys, first, group = np.unique(columns, axis=0, return_index=True, return_inverse=True)
    del keys
    representative = columns[first]
    return CatalogueGroups(
        group=np.asarray(group, dtype=np.int64).reshape(-1),
        category=representative[:, 0],
        department=representative[:, 1],
        items=representative[:, 2:],
    )


@dataclass(frozen=True)
class CatalogueTerms:
    """What the full ranking pass computes from the weights and the catalogue alone, kept by a
    caller that ranks the same catalogue with the same weights many times (serving)."""

    group: torch.Tensor  # [C] the group of each catalogue position
    bias: torch.Tensor  # [C] each product's prior
    category: torch.Tensor  # [G, D] category embedding of each group
    department: torch.Tensor  # [G, D] department embedding of each group


@torch.no_grad()
def catalogue_terms(
    model: BasketScorer, shop: np.ndarray, items: np.ndarray, groups: CatalogueGroups
) -> CatalogueTerms:
    """:class:`CatalogueTerms` of ``model`` for the catalogue ``shop`` (product codes)."""
    if len(groups.group) != len(shop):
        raise ValueError(f"groups cover {len(groups.group)} products, catalogue has {len(shop)}")
    device = next(model.parameters()).device
    return CatalogueTerms(
        group=torch.from_numpy(groups.group).to(device),
        bias=model.product_bias(torch.from_numpy(items[shop, 0]).to(device)).squeeze(-1),
        category=model.categories(torch.from_numpy(groups.items[:, 0]).to(device)),
        department=model.departments(torch.from_numpy(groups.items[:, 1]).to(device)),
    )


@torch.no_grad()
def score_catalogue(
    model: BasketScorer,
    features: HistoryFeatures,
    cases: CaseSet,
    items: np.ndarray,
    *,
    groups: CatalogueGroups | None = None,
    terms: CatalogueTerms | None = None,
    batch_cases: int = 256,
) -> np.ndarray:
    """[cases, catalogue] shared scores: the full ranking pass for a store.

    ``features`` are :func:`history_features` of ``cases``; ``items`` is
    :func:`records.item_ids` of their log; ``groups`` are :func:`catalogue_groups` of
    ``cases.catalogue`` if the caller keeps them, ``terms`` their :func:`catalogue_terms` for
    ``model`` if it keeps those too.

    The model's forward pass, arranged so that it costs per (case, category group) and per
    (case, history product) instead of per (case, catalogue product): a product outside the
    household's history has ``in_history = 0``, so its score is ``product_bias + explore``, and
    its explore term depends on the product only through its category and department. So the
    explore MLP runs once per group (:class:`CatalogueGroups`), each product adds its bias,
    and the repeat MLP runs only for the products in the household's history, whose score
    is ``bias + explore + repeat`` as in :meth:`BasketScorer.forward`. Equal to the forward
    pass over every product up to float rounding (tests/test_nextbasket_model.py); evaluation
    and serving both rank with this function.
    """
    model.eval()
    device = next(model.parameters()).device
    shop = np.asarray(cases.catalogue, dtype=np.int64)
    out = np.zeros((len(cases), len(shop)), dtype=np.float32)
    if len(cases) == 0 or len(shop) == 0:
        return out
    if groups is None:
        groups = catalogue_groups(
            features.product_category, features.product_department, shop, items
        )
    if terms is None:
        terms = catalogue_terms(model, shop, items, groups)
    if len(terms.group) != len(shop) or len(terms.category) != len(groups.category):
        raise ValueError("catalogue terms were computed for another catalogue")
    group, bias = terms.group, terms.bias
    group_category, group_department = terms.category, terms.department
    size = len(groups.category)
    for start in range(0, len(cases), batch_cases):
        rows = np.arange(start, min(start + batch_cases, len(cases)))
        context = np.concatenate(
            [
                np.repeat(features.household[rows][:, None, :], size, axis=1),
                features.category_share[rows][:, groups.category],
                features.department_share[rows][:, groups.department],
            ],
            axis=2,
        )
        # affinity columns in lookup() order: category plain, decayed, department plain, decayed
        explore = model.explore_term(
            torch.from_numpy(context).to(device),
            group_category.unsqueeze(0).expand(len(rows), -1, -1),
            group_department.unsqueeze(0).expand(len(rows), -1, -1),
        )
        scores = bias.unsqueeze(0) + explore[:, group]
        case, position = _history_in_catalogue(features, rows, shop)
        if len(case):
            x = torch.from_numpy(features.lookup(case, shop[position])).to(device)
            ids = torch.from_numpy(items[shop[position]]).to(device)
            repeat = model.repeat_term(
                x.unsqueeze(0),
                model.categories(ids[:, 1]).unsqueeze(0),
                model.departments(ids[:, 2]).unsqueeze(0),
            ).squeeze(0)
            local = torch.from_numpy(case - start).to(device)
            at = torch.from_numpy(position).to(device)
            scores[local, at] = scores[local, at] + x[:, 0] * repeat
        out[rows] = scores.float().cpu().numpy()
    return out


def _history_in_catalogue(
    features: HistoryFeatures, rows: np.ndarray, shop: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(case, catalogue position) of every history product of ``rows`` that is in ``shop``
    (sorted product codes)."""
    n = features.n_products
    lo, hi = np.searchsorted(features.pair_key, [rows[0] * n, (rows[-1] + 1) * n])
    keys = features.pair_key[lo:hi]
    case, product = keys // n, keys % n
    at, inside = catalogue_positions(shop, product)
    return case[inside], at[inside]
