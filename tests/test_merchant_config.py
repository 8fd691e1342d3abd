"""``merchant.toml`` is written by provisioning and the online loop and read by the client."""

from __future__ import annotations

import math
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from client.inbox import ArrivalMode
from client.merchant import MerchantConfig
from common.accounting import PrivacyUnit

_names = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="/\\\0"),
    min_size=1,
    max_size=20,
)
_paths = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"),
    min_size=1,
    max_size=30,
).map(lambda s: Path("/") / s.strip("/") if s.strip("/") else Path("/x"))
_positive = st.floats(min_value=1e-6, max_value=1e6, allow_nan=False, allow_infinity=False)


@settings(max_examples=150, deadline=None)
@given(
    merchant_id=_names,
    data=_paths,
    inbox=st.none() | _paths,
    epsilon_cap=_positive,
    delta=st.floats(min_value=1e-12, max_value=0.5),
    unit=st.sampled_from(PrivacyUnit),
    arrival=st.sampled_from(ArrivalMode),
    stream_cap=_positive,
    threads=st.integers(min_value=1, max_value=64),
    allow=st.booleans(),
)
def test_to_toml_reads_back_equal(
    tmp_path_factory,
    merchant_id: str,
    data: Path,
    inbox: Path | None,
    epsilon_cap: float,
    delta: float,
    unit: PrivacyUnit,
    arrival: ArrivalMode,
    stream_cap: float,
    threads: int,
    allow: bool,
) -> None:
    config = MerchantConfig(
        id=merchant_id,
        data=data,
        state_dir=Path("/state") / "s",
        signing_key=Path("/keys/k.pem"),
        epsilon_cap=epsilon_cap,
        delta=delta,
        privacy_unit=unit,
        threads=threads,
        allow_non_private=allow,
        inbox=inbox,
        inbox_arrival=arrival,
        stream_epsilon_cap=stream_cap,
    )
    path = tmp_path_factory.mktemp("m") / "merchant.toml"
    path.write_text(config.to_toml(), encoding="utf-8")
    again = MerchantConfig.from_toml(path)
    assert again == config
    assert math.isfinite(again.epsilon_cap)
