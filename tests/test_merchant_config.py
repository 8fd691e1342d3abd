"""``merchant.toml`` is written by provisioning and the online loop and read by the client."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import tomli_w
from hypothesis import given, settings
from hypothesis import strategies as st
from test_ledger_support import make_release

from client.inbox import ArrivalMode
from client.merchant import MerchantConfig
from common.accounting import PrivacyUnit
from common.errors import ConfigError
from common.keys import generate_keypair, load_signing_key
from common.ledger import MerchantLedger

_names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", fullmatch=True)
_paths = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"),
    min_size=1,
    max_size=30,
).map(lambda s: Path("/") / s.strip("/") if s.strip("/") else Path("/x"))
_positive = st.floats(min_value=1e-6, max_value=100, allow_nan=False, allow_infinity=False)


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


def _ledger_accepts(merchant_id: str) -> bool:
    try:
        make_release(merchant_id)
    except ConfigError:
        return False
    return True


def _config_accepts(merchant_id: str) -> bool:
    try:
        MerchantConfig(merchant_id, data=Path("/d"), state_dir=Path("/s"), signing_key=Path("/k"))
    except ConfigError:
        return False
    return True


@settings(max_examples=300, deadline=None)
@given(merchant_id=st.text(max_size=12) | _names)
def test_config_accepts_exactly_the_ids_the_ledger_accepts(merchant_id: str) -> None:
    assert _config_accepts(merchant_id) == _ledger_accepts(merchant_id)


@pytest.mark.parametrize(
    "merchant_id", ["store 367", "", "-store", ".hidden", "a/b", "magasin-é", "x" * 129, "m\n"]
)
def test_ids_the_ledger_refuses_are_refused_when_the_config_is_loaded(
    tmp_path: Path, merchant_id: str
) -> None:
    private, _ = generate_keypair(tmp_path / "keys", name="key")
    with pytest.raises(ConfigError, match="not a valid merchant name"):
        MerchantLedger.open(
            tmp_path / "l.sqlite", merchant_id=merchant_id, signing_key=load_signing_key(private)
        )
    toml = tmp_path / "merchant.toml"
    table = {"id": merchant_id, "data": "d", "state_dir": "s", "signing_key": "k"}
    toml.write_text(tomli_w.dumps({"merchant": table}), encoding="utf-8")
    with pytest.raises(ConfigError, match=r"merchant\.toml: merchant\.id .* not a valid"):
        MerchantConfig.from_toml(toml)


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("epsilon_cap", 1e300, r"merchant\.epsilon_cap must be in \(0, 100\], got 1e\+300"),
        ("epsilon_cap", 0.0, r"merchant\.epsilon_cap must be in \(0, 100\]"),
        ("stream_epsilon_cap", 0.0, r"merchant\.stream_epsilon_cap must be in \(0, 100\]"),
        ("stream_epsilon_cap", 101.0, r"merchant\.stream_epsilon_cap must be in \(0, 100\]"),
        ("max_noise_multiplier", 0.1, r"merchant\.max_noise_multiplier must be >= 0\.3"),
        ("delta", 1.0, r"merchant\.delta must be in \(0, 1\)"),
    ],
)
def test_privacy_settings_out_of_range_are_refused_naming_file_and_key(
    tmp_path: Path, key: str, value: float, expected: str
) -> None:
    toml = tmp_path / "merchant.toml"
    table = {"id": "store-1", "data": "d", "state_dir": "s", "signing_key": "k", key: value}
    toml.write_text(tomli_w.dumps({"merchant": table}), encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"merchant\.toml: {expected}"):
        MerchantConfig.from_toml(toml)
