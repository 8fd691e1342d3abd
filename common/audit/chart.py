"""Each merchant's epsilon over its releases against its cap, as inline SVG.

One small panel per merchant (small multiples stay readable at a hundred merchants): x is
the release's position in the merchant's ledger, y the cumulative epsilon after it (the
axis is labelled at the caps). Each cohort is one solid line; its cap is a dashed line of
the same colour; a release above its
cap is marked red and the panel gets a red frame. Plain SVG written here, no scripts and no
URLs, so the report opens offline and renders the same everywhere.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from common.audit.budgets import release_summaries
from common.ledger import LedgerEntry

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#17becf", "#7f7f7f")
OVER_CAP = "#d62728"
WIDTH, HEIGHT = 280, 170
LEFT, RIGHT, TOP, BOTTOM = 44, 12, 26, 30


@dataclass(frozen=True)
class Point:
    release: int  # 1-based position in the merchant's ledger
    epsilon: float
    cap: float


def cohort_points(chain: Sequence[LedgerEntry]) -> dict[str, list[Point]]:
    """Per cohort, in ledger order: where each release left epsilon, and the cap."""
    points: dict[str, list[Point]] = {}
    for position, summary in enumerate(release_summaries(chain), start=1):
        point = Point(position, summary.epsilon_after, summary.epsilon_cap)
        points.setdefault(summary.cohort, []).append(point)
    return points


def over_cap(points: Mapping[str, Sequence[Point]]) -> bool:
    return any(p.epsilon > p.cap for series in points.values() for p in series)


class _Frame:
    """Maps (release, epsilon) to panel pixels."""

    def __init__(self, releases: int, top_epsilon: float) -> None:
        self.releases = max(releases, 1)
        self.top = top_epsilon if top_epsilon > 0 else 1.0

    @property
    def step(self) -> float:
        """Pixels between two releases."""
        return (WIDTH - LEFT - RIGHT) / max(self.releases - 1, 1)

    def x(self, release: float) -> float:
        span = WIDTH - LEFT - RIGHT
        if self.releases == 1:
            return LEFT + span / 2
        return LEFT + span * (release - 1) / (self.releases - 1)

    def y(self, epsilon: float) -> float:
        return TOP + (HEIGHT - TOP - BOTTOM) * (1 - min(epsilon, self.top) / self.top)


def _axes(frame: _Frame, merchant_id: str) -> list[str]:
    bottom, right = HEIGHT - BOTTOM, WIDTH - RIGHT
    return [
        f'<text x="{LEFT}" y="16" class="title">{html.escape(merchant_id)}</text>',
        f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{bottom}" class="axis"/>',
        f'<line x1="{LEFT}" y1="{bottom}" x2="{right}" y2="{bottom}" class="axis"/>',
        f'<text x="{LEFT - 4}" y="{bottom}" class="tick" text-anchor="end">0</text>',
        f'<text x="{frame.x(1):.1f}" y="{bottom + 13}" class="tick" text-anchor="middle">1</text>',
        f'<text x="{frame.x(frame.releases):.1f}" y="{bottom + 13}" class="tick" '
        f'text-anchor="middle">{frame.releases}</text>',
        f'<text x="{(LEFT + right) / 2:.1f}" y="{HEIGHT - 4}" class="label" '
        'text-anchor="middle">release</text>',
    ]


def _cohort(frame: _Frame, cohort: str, series: Sequence[Point], colour: str) -> list[str]:
    name = html.escape(cohort)
    xs = [frame.x(p.release) for p in series]
    cap = series[-1].cap
    half_step = max(frame.step / 2, 6.0)
    start, end = max(LEFT, min(xs) - half_step), min(WIDTH - RIGHT, max(xs) + half_step)
    shapes = [
        f'<line x1="{start:.1f}" y1="{frame.y(cap):.1f}" x2="{end:.1f}" '
        f'y2="{frame.y(cap):.1f}" stroke="{colour}" class="cap"><title>{name}: cap '
        f"{cap:g}</title></line>"
    ]
    path = " ".join(f"{x:.1f},{frame.y(p.epsilon):.1f}" for x, p in zip(xs, series, strict=True))
    shapes.append(
        f'<polyline points="{path}" stroke="{colour}" class="spent"><title>{name}: epsilon '
        f"{series[-1].epsilon:.4g} of {cap:g} after {len(series)} release(s)</title></polyline>"
    )
    for x, p in zip(xs, series, strict=True):
        fill = OVER_CAP if p.epsilon > p.cap else colour
        shapes.append(f'<circle cx="{x:.1f}" cy="{frame.y(p.epsilon):.1f}" r="2.5" fill="{fill}"/>')
    return shapes


def cohort_colours(chains: Mapping[str, Sequence[LedgerEntry]]) -> dict[str, str]:
    """One colour per cohort name across all merchants, so a cohort looks the same everywhere."""
    names = sorted({s.cohort for chain in chains.values() for s in release_summaries(chain)})
    return {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(names)}


def merchant_panel(
    merchant_id: str, chain: Sequence[LedgerEntry], colours: Mapping[str, str] | None = None
) -> str:
    """One merchant's panel as an ``<svg>`` element."""
    points = cohort_points(chain)
    colours = colours or cohort_colours({merchant_id: chain})
    releases = max((p.release for s in points.values() for p in s), default=1)
    top = max((max(p.epsilon, p.cap) for s in points.values() for p in s), default=1.0)
    frame = _Frame(releases, top * 1.08)
    shapes = _axes(frame, merchant_id)
    caps = sorted({p.cap for series in points.values() for p in series})
    shapes += [
        f'<text x="{LEFT - 4}" y="{frame.y(cap) + 4:.1f}" class="tick" text-anchor="end">'
        f"{cap:g}</text>"
        for cap in caps[-3:]
    ]
    for cohort in sorted(points):
        shapes += _cohort(frame, cohort, points[cohort], colours[cohort])
    over = over_cap(points)
    border = f'<rect x="0.5" y="0.5" width="{WIDTH - 1}" height="{HEIGHT - 1}" class="frame"' + (
        f' stroke="{OVER_CAP}" stroke-width="3"/>' if over else "/>"
    )
    state = "over-cap" if over else "within-cap"
    return (
        f'<svg class="panel {state}" data-merchant="{html.escape(merchant_id)}" '
        f'width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" role="img">'
        f"<title>merchant {html.escape(merchant_id)}: epsilon per release against its cap</title>"
        f"{border}{''.join(shapes)}</svg>"
    )


CHART_CSS = """
#epsilon-chart{display:flex;flex-wrap:wrap;gap:8px;margin:1em 0}
#epsilon-chart svg{background:#fff}
#epsilon-chart .title{font:bold 12px sans-serif}
#epsilon-chart .tick,#epsilon-chart .label{font:10px sans-serif;fill:#555}
#epsilon-chart .axis{stroke:#999}
#epsilon-chart .frame{fill:none;stroke:#ccc}
#epsilon-chart .spent{fill:none;stroke-width:2}
#epsilon-chart .cap{stroke-dasharray:5 3;stroke-width:1.5}
"""


def epsilon_chart(chains: Mapping[str, Sequence[LedgerEntry]]) -> str:
    """Every merchant with releases, one panel each, sorted by merchant id."""
    colours = cohort_colours(chains)
    panels = "".join(merchant_panel(m, chains[m], colours) for m in sorted(chains) if chains[m])
    legend = (
        '<p class="legend">Solid line: cumulative epsilon after each release, one colour per '
        "cohort; dashed line: that cohort's cap; red point: a release above its cap.</p>"
    )
    return f'{legend}<div id="epsilon-chart">{panels}</div>'
