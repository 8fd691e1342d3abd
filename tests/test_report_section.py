"""Benchmarks share docs/results.md through marked sections; rewriting one keeps the rest."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from report_section import read_section, write_section

TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r"))


def test_section_is_appended_then_replaced_in_place(tmp_path: Path) -> None:
    report = tmp_path / "results.md"
    report.write_text("# Results\n\ntable\n")
    write_section(report, "online", "first")
    write_section(report, "online", "second")
    text = report.read_text()
    assert text.startswith("# Results\n\ntable\n")
    assert "first" not in text and text.count("second") == 1
    assert read_section(report, "online") == (
        "<!-- section:online begin -->\nsecond\n<!-- section:online end -->"
    )
    assert read_section(report, "other") is None
    assert not list(tmp_path.glob("*.partial"))


@settings(max_examples=50, deadline=None)
@given(head=TEXT, body=TEXT, other=TEXT)
def test_rewriting_one_section_keeps_every_other_line(head: str, body: str, other: str) -> None:
    with tempfile.TemporaryDirectory() as root:
        report = Path(root) / "results.md"
        report.write_text(head)
        write_section(report, "a", "x")
        write_section(report, "b", other or "y")
        write_section(report, "a", body or "z")
        assert report.read_text().startswith(head.rstrip("\n"))
        assert read_section(report, "b") is not None
        assert (body or "z").strip() in (read_section(report, "a") or "")
