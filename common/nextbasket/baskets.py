"""Baskets and next-basket cases from one merchant's canonical events.

A *basket* is one customer's events with the same timestamp (one visit). Events are held as
integer arrays sorted by customer, then time, then product, so that a customer's history
before any moment is a contiguous slice: that makes features for thousands of
(customer, moment) pairs a handful of vectorised operations.

A *case* is one basket to predict: the customer, the moment of the visit (scoring time: the
visit is known to be happening, its contents are not), the customer's history at this merchant
(every event strictly before the visit) and the products bought. Two kinds:

- held-out cases (:func:`heldout_cases`): for every household with a basket in a held-out period,
  its *first* basket there; its history is everything before the period. Households without
  history (cold start) are kept: every item they buy is an explore item.
- training cases (:func:`basket_cases`): every basket in a range of weeks, each with the
  history before it.

The ranked *catalogue* is every product the merchant sold in the catalogue weeks (the training
weeks). A bought product outside it stays in the basket as an unrankable miss, so recall is
measured against everything the household bought.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from common.errors import DataValidationError
from common.events import CATEGORY, CUSTOMER_ID, DEPARTMENT, MERCHANT_ID, PRODUCT_ID, TIMESTAMP
from common.split import WEEK, with_weeks

_NS_PER_DAY = 86_400 * 10**9
_NEEDED = (MERCHANT_ID, CUSTOMER_ID, PRODUCT_ID, TIMESTAMP, CATEGORY, DEPARTMENT)


def concatenated_ranges(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """``concatenate([arange(s, e) for s, e in zip(starts, ends)])`` without a Python loop."""
    sizes = np.asarray(ends, dtype=np.int64) - np.asarray(starts, dtype=np.int64)
    offsets = np.r_[0, np.cumsum(sizes)[:-1]].astype(np.int64)
    return np.repeat(np.asarray(starts, dtype=np.int64) - offsets, sizes) + np.arange(sizes.sum())


def catalogue_positions(
    catalogue: np.ndarray, products: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(position of each of ``products`` in the sorted ``catalogue``, whether it is there);
    a position is meaningful only where the second array is true."""
    slot = np.searchsorted(catalogue, products)
    inside = slot < len(catalogue)
    inside[inside] = catalogue[slot[inside]] == products[inside]
    return slot, inside


@dataclass(frozen=True)
class BasketLog:
    """One merchant's purchases as integer arrays (events sorted by customer, day, product).

    ``customer_start[c]:customer_start[c + 1]`` are customer ``c``'s events; ``repeat[e]`` says
    whether the customer bought that product in an earlier basket.
    """

    merchant_id: str
    customer_ids: np.ndarray  # [U] customer id per customer code
    product_ids: np.ndarray  # [P] product id per product code
    categories: np.ndarray  # [P] product category ('' if unknown)
    departments: np.ndarray  # [P] product department ('' if unknown)
    customer: np.ndarray  # [E] int64 customer code
    product: np.ndarray  # [E] int64 product code
    day: np.ndarray  # [E] float64 days since 1970-01-01 UTC
    week: np.ndarray  # [E] int64
    basket: np.ndarray  # [E] int64 basket number, increasing in event order
    repeat: np.ndarray  # [E] bool
    customer_start: np.ndarray  # [U + 1] int64

    @property
    def n_products(self) -> int:
        return len(self.product_ids)

    @property
    def n_customers(self) -> int:
        return len(self.customer_ids)

    def __len__(self) -> int:
        return len(self.product)

    def basket_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """(first event, one past the last event) of every basket, in basket order."""
        starts = np.flatnonzero(np.r_[True, self.basket[1:] != self.basket[:-1]])
        return starts, np.r_[starts[1:], len(self)]


def _check_frame(events: pd.DataFrame, source: str) -> str:
    missing = [c for c in _NEEDED if c not in events.columns]
    if missing:
        raise DataValidationError(
            f"missing column(s) {missing}; a basket log needs {list(_NEEDED)}",
            file=source,
            column=missing[0],
        )
    if len(events) == 0:
        raise DataValidationError("no events: a basket log needs at least one", file=source)
    merchants = pd.unique(events[MERCHANT_ID])
    if len(merchants) != 1:
        shown = ", ".join(map(str, merchants[:5]))
        raise DataValidationError(
            f"events of {len(merchants)} merchants ({shown}...); a basket log holds one merchant",
            file=source,
            column=MERCHANT_ID,
        )
    return str(merchants[0])


def _repeat_flags(customer: np.ndarray, product: np.ndarray, order_key: np.ndarray) -> np.ndarray:
    """True where the customer bought the product at an earlier position of ``order_key``."""
    order = np.lexsort((order_key, product, customer))
    c, p = customer[order], product[order]
    first_of_pair = np.r_[True, (c[1:] != c[:-1]) | (p[1:] != p[:-1])]
    flags = np.empty(len(customer), dtype=bool)
    flags[order] = ~first_of_pair
    return flags


def basket_log(
    events: pd.DataFrame,
    *,
    origin: pd.Timestamp | str | None = None,
    source: str = "events",
) -> BasketLog:
    """Index one merchant's canonical events (columns of common/events.py, plus ``week`` if the
    caller has one; otherwise weeks are counted from ``origin``)."""
    merchant = _check_frame(events, source)
    dated = with_weeks(events, origin=origin)
    customer, customer_ids = pd.factorize(dated[CUSTOMER_ID], sort=True)
    product, product_ids = pd.factorize(dated[PRODUCT_ID], sort=True)
    stamps = pd.DatetimeIndex(dated[TIMESTAMP])
    utc = stamps.tz_convert("UTC") if stamps.tz is not None else stamps
    nanos = utc.as_unit("ns").asi8
    order = np.lexsort((product, nanos, customer))
    customer, product, nanos = customer[order], product[order], nanos[order]
    new_basket = np.r_[True, (customer[1:] != customer[:-1]) | (nanos[1:] != nanos[:-1])]
    metadata = (
        pd.DataFrame({"p": product, CATEGORY: dated[CATEGORY].to_numpy()[order]})
        .assign(**{DEPARTMENT: dated[DEPARTMENT].to_numpy()[order]})
        .drop_duplicates("p")
        .sort_values("p")
    )
    return BasketLog(
        merchant_id=merchant,
        customer_ids=np.asarray(customer_ids, dtype=object),
        product_ids=np.asarray(product_ids, dtype=object),
        categories=metadata[CATEGORY].astype(str).to_numpy(dtype=object),
        departments=metadata[DEPARTMENT].astype(str).to_numpy(dtype=object),
        customer=customer.astype(np.int64),
        product=product.astype(np.int64),
        day=nanos.astype(np.float64) / _NS_PER_DAY,
        week=dated[WEEK].to_numpy(dtype=np.int64)[order],
        basket=np.cumsum(new_basket, dtype=np.int64) - 1,
        repeat=_repeat_flags(customer, product, nanos),
        customer_start=np.searchsorted(customer, np.arange(len(customer_ids) + 1)).astype(np.int64),
    )


@dataclass(frozen=True)
class CaseSet:
    """Baskets to predict at one merchant, each with its history and the catalogue to rank.

    Basket items of case ``i`` are ``basket_products[basket_indptr[i]:basket_indptr[i + 1]]``;
    ``basket_slot`` is each item's index in ``catalogue`` or -1 (not rankable: the merchant
    did not sell it in the catalogue weeks); ``basket_repeat`` says whether the household
    bought it before (a repeat item) or not (an explore item).
    """

    merchant_id: str
    customer: np.ndarray  # [n] customer code
    day: np.ndarray  # [n] scoring time: the visit's timestamp in days
    history_start: np.ndarray  # [n] first history event (the customer's first event)
    history_end: np.ndarray  # [n] one past the last history event
    basket_indptr: np.ndarray  # [n + 1]
    basket_products: np.ndarray  # [m] product codes
    basket_slot: np.ndarray  # [m] catalogue index or -1
    basket_repeat: np.ndarray  # [m] bool
    catalogue: np.ndarray  # [C] product codes, sorted

    def __len__(self) -> int:
        return len(self.customer)

    @property
    def basket_sizes(self) -> np.ndarray:
        return np.diff(self.basket_indptr)

    def case_of_item(self) -> np.ndarray:
        """[m] the case each basket item belongs to."""
        return np.repeat(np.arange(len(self)), self.basket_sizes)

    def subset(self, rows: np.ndarray) -> CaseSet:
        """The cases ``rows`` (in that order), same catalogue."""
        rows = np.asarray(rows, dtype=np.int64)
        starts, ends = self.basket_indptr[rows], self.basket_indptr[rows + 1]
        sizes = ends - starts
        items = concatenated_ranges(starts, ends)
        return CaseSet(
            merchant_id=self.merchant_id,
            customer=self.customer[rows],
            day=self.day[rows],
            history_start=self.history_start[rows],
            history_end=self.history_end[rows],
            basket_indptr=np.r_[0, np.cumsum(sizes)].astype(np.int64),
            basket_products=self.basket_products[items],
            basket_slot=self.basket_slot[items],
            basket_repeat=self.basket_repeat[items],
            catalogue=self.catalogue,
        )


def catalogue(log: BasketLog, weeks: tuple[int, int]) -> np.ndarray:
    """Product codes the merchant sold in ``weeks`` (inclusive), sorted."""
    first, last = weeks
    sold = (log.week >= first) & (log.week <= last)
    return np.unique(log.product[sold])


def _cases(log: BasketLog, chosen: np.ndarray, shop: np.ndarray) -> CaseSet:
    """Cases for the baskets whose first events are ``chosen`` (sorted event indices)."""
    starts, ends = log.basket_bounds()
    ends = ends[np.searchsorted(starts, chosen)]
    sizes = ends - chosen
    items = concatenated_ranges(chosen, ends)
    products = log.product[items]
    slot, found = catalogue_positions(shop, products)
    customer = log.customer[chosen]
    return CaseSet(
        merchant_id=log.merchant_id,
        customer=customer,
        day=log.day[chosen],
        history_start=log.customer_start[customer],
        history_end=chosen.astype(np.int64),
        basket_indptr=np.r_[0, np.cumsum(sizes)].astype(np.int64),
        basket_products=products,
        basket_slot=np.where(found, slot, -1).astype(np.int64),
        basket_repeat=log.repeat[items],
        catalogue=shop,
    )


def heldout_cases(
    log: BasketLog, *, period: tuple[int, int], catalogue_weeks: tuple[int, int]
) -> CaseSet:
    """One case per household with a basket in ``period``: its first basket there."""
    if not 1 <= period[0] <= period[1]:
        raise DataValidationError(f"held-out period {period} must be 1 <= first <= last weeks")
    if period[0] <= catalogue_weeks[1]:
        raise DataValidationError(
            f"held-out period {period} overlaps the catalogue weeks {catalogue_weeks}"
        )
    inside = np.flatnonzero((log.week >= period[0]) & (log.week <= period[1]))
    # events are sorted by customer and time, so a customer's first event in the period is
    # the first event of its first basket there
    first = inside[np.r_[True, log.customer[inside][1:] != log.customer[inside][:-1]]]
    return _cases(log, first, catalogue(log, catalogue_weeks))


def basket_cases(
    log: BasketLog, *, weeks: tuple[int, int], catalogue_weeks: tuple[int, int]
) -> CaseSet:
    """One case per basket that starts in ``weeks`` (training targets)."""
    starts, _ = log.basket_bounds()
    week = log.week[starts]
    chosen = starts[(week >= weeks[0]) & (week <= weeks[1])]
    return _cases(log, chosen, catalogue(log, catalogue_weeks))


def merchant_logs(frame: pd.DataFrame, *, source: str = "events") -> dict[str, BasketLog]:
    """One basket log per merchant of a multi-merchant frame, keyed by merchant id."""
    return {
        str(merchant): basket_log(part, source=f"{source} (merchant {merchant})")
        for merchant, part in frame.groupby(MERCHANT_ID, sort=True)
    }
