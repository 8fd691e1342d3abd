"""The folders are the architecture: common <- client, common <- server; simulations composes."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "common": {"client", "server", "simulations"},
    "client": {"server", "simulations"},
    "server": {"client", "simulations"},
}


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_layering(package):
    offenders = {
        str(path.relative_to(ROOT)): sorted(imported_packages(path) & FORBIDDEN[package])
        for path in (ROOT / package).rglob("*.py")
        if imported_packages(path) & FORBIDDEN[package]
    }
    assert not offenders, f"{package} must not import {sorted(FORBIDDEN[package])}: {offenders}"


def test_detector_sees_imports(tmp_path):
    sample = tmp_path / "x.py"
    sample.write_text("import client.app\nfrom server import federation\n")
    assert imported_packages(sample) == {"client", "server"}


# What only a merchant may touch: its DP secret and its customers' event files.
MERCHANT_ONLY = {
    "read_events",
    "read_parquet",
    "read_csv",
    "read_table",
    "load_merchant_secret",
    "ensure_merchant_secret",
    "MerchantSecret",
    "dp_randomness",
    "SECRET_FILE",
    "dp-secret",
    "events.parquet",
}


def merchant_only_uses(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    used: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            used.add(node.id)
        elif isinstance(node, ast.Attribute):
            used.add(node.attr)
        elif isinstance(node, ast.ImportFrom):
            used.update(alias.name for alias in node.names)
            used.update((node.module or "").split("."))
        elif isinstance(node, ast.Import):
            used.update(part for alias in node.names for part in alias.name.split("."))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            used.update(word for word in MERCHANT_ONLY if word in node.value)
    return used & MERCHANT_ONLY


def test_platform_code_never_reads_merchant_secrets_or_event_files():
    offenders = {
        str(path.relative_to(ROOT)): sorted(merchant_only_uses(path))
        for path in (ROOT / "server").rglob("*.py")
        if merchant_only_uses(path)
    }
    assert not offenders, f"server/ must not read merchants' secrets or events: {offenders}"


def test_merchant_only_detector_sees_reads(tmp_path):
    sample = tmp_path / "x.py"
    sample.write_text(
        "import pandas as pd\nfrom client.dp_randomness import load_merchant_secret\n"
        "pd.read_parquet('m/events.parquet')\n"
    )
    assert merchant_only_uses(sample) == {
        "dp_randomness",
        "load_merchant_secret",
        "read_parquet",
        "events.parquet",
    }
