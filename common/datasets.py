"""A simulation's events, whatever their source, with the time split that fits them.

Complete Journey, synthetic data and a data scientist's own files all end here as one
canonical table of the merchants that take part and one :class:`~common.split.TimeSplit`,
checked so that every merchant has events to train on and to be tested on.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import pandas as pd

from common.config import DataConfig, DataSource, RunConfig
from common.errors import ConfigError, DataValidationError
from common.events import MERCHANT_ID, TIMESTAMP, parse_mapping
from common.split import TimeSplit


@dataclass(frozen=True)
class Dataset:
    """Selected merchants' events, their split, and where each merchant's events came from."""

    events: pd.DataFrame
    split: TimeSplit
    sources: Mapping[str, str]

    def parts(self) -> dict[str, dict[str, pd.DataFrame]]:
        """``{merchant: {"train", "valid", "test"}}``; raises if a merchant lacks training or
        test events, naming the merchant, its file and the period."""
        parts = {
            str(merchant): self.split.split(group.reset_index(drop=True))
            for merchant, group in self.events.groupby(MERCHANT_ID, sort=True)
        }
        for merchant, split in parts.items():
            for name in ("train", "test"):
                if split[name].empty:
                    raise self._empty_part(merchant, name)
        return parts

    def _empty_part(self, merchant: str, part: str) -> DataValidationError:
        own = self.events.loc[self.events[MERCHANT_ID] == merchant, TIMESTAMP]
        period = self.split.periods()[part]
        return DataValidationError(
            f"merchant {merchant!r} has no {'training' if part == 'train' else 'test'} events: "
            f"its events run from {own.min():%Y-%m-%d %H:%M} to {own.max():%Y-%m-%d %H:%M}, "
            f"the {part} period is {period.describe()} UTC ({self.split.rule.value} split); "
            "choose other dates (data.train_until, data.valid_until) or leave the merchant out",
            file=self.sources.get(merchant),
        )


def week_origin(source: DataSource) -> pd.Timestamp | None:
    """Start of week 1 for the sources that count weeks."""
    if source is DataSource.COMPLETEJOURNEY:
        from common.completejourney import CJ_WEEK_ORIGIN

        return CJ_WEEK_ORIGIN
    if source is DataSource.SYNTHETIC:
        from common.synthetic import ORIGIN

        return ORIGIN
    return None


def plan_split(data: DataConfig, events: pd.DataFrame) -> TimeSplit:
    """The split for ``events`` under ``data``: global, from all merchants' events together."""
    if events.empty:
        raise DataValidationError("no events to split")
    stamps = events[TIMESTAMP]
    return data.time_split(
        first_event=stamps.min(), last_event=stamps.max(), week_origin=week_origin(data.source)
    )


def _sources_of(events: pd.DataFrame, label: str) -> dict[str, str]:
    return {str(m): label for m in pd.unique(events[MERCHANT_ID])}


def load_events(config: RunConfig) -> tuple[pd.DataFrame, dict[str, str]]:
    """The selected merchants' canonical events and where each merchant's came from, without
    the merchants ``data.exclude`` names."""
    events, sources = _selected_events(config)
    if not config.data.exclude:
        return events, sources
    selected = {str(m) for m in pd.unique(events[MERCHANT_ID])}
    dropped = set(config.data.exclude)
    if unknown := sorted(dropped - selected):
        raise ConfigError(
            f"data.exclude names {unknown}, not among the selected merchants {sorted(selected)}"
        )
    if selected <= dropped:
        raise ConfigError("data.exclude leaves out every selected merchant")
    kept = ~events[MERCHANT_ID].isin(dropped)
    return events[kept].reset_index(drop=True), {
        m: s for m, s in sources.items() if m not in dropped
    }


def _selected_events(config: RunConfig) -> tuple[pd.DataFrame, dict[str, str]]:
    data = config.data
    if data.source is DataSource.COMPLETEJOURNEY:
        from common.completejourney import SOURCE, load_merchants

        events = load_merchants(top_n=data.top_n, min_rows=data.min_rows)
        return events, _sources_of(events, SOURCE)
    if data.source is DataSource.SYNTHETIC:
        from common.synthetic import SyntheticSpec, generate_events

        spec = SyntheticSpec(
            n_merchants=data.top_n,
            events_per_merchant=data.synthetic_events_per_merchant,
            seed=config.seed,
        )
        events = generate_events(spec)
        return events, _sources_of(events, "synthetic")
    from common.merchant_files import read_merchant_files, select_merchants

    files = read_merchant_files(data.path, mapping=parse_mapping(data.mapping))
    events = select_merchants(files.events, top_n=data.top_n, min_rows=data.min_rows)
    return events, dict(files.sources)


def load_dataset(config: RunConfig, *, events: pd.DataFrame | None = None) -> Dataset:
    """The events of ``config.data`` (or the given ``events``) with their split."""
    if events is None:
        events, sources = load_events(config)
    else:
        sources = _sources_of(events, "the given events")
    return Dataset(events, plan_split(config.data, events), sources)
