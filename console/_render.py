"""What the templates need beyond Jinja2: value formatting, the step timeline and the rate chart, as
plain data (SVG coordinates), so no inline style or script is needed and every piece is testable."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import jinja2
import orjson
from aiohttp import web

ENV: Final = web.AppKey("jinja", jinja2.Environment)
LONG_TEXT_CHARS: Final = 600
"""Text longer than this (a trace, an output) starts collapsed."""
SHOWN_JSON_CHARS: Final = 20_000
"""Characters of one JSON value (metadata, an event) a page shows; the rest is in the JSONL line."""


def install(env: jinja2.Environment) -> None:
    env.filters["pretty"] = pretty
    env.filters["when"] = when
    env.filters["duration"] = duration
    env.filters["clip"] = clip
    env.filters["number"] = number
    env.globals["LONG_TEXT_CHARS"] = LONG_TEXT_CHARS
    env.globals["chart"] = chart
    env.globals["duration"] = duration


def pretty(value: Any) -> str:
    """JSON, indented, for a person; text stays text."""
    if isinstance(value, str):
        return clip(value)
    try:
        text = orjson.dumps(value, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS).decode()
    except TypeError:
        text = repr(value)
    return clip(text)


def clip(value: Any, total_chars: int | None = None, limit: int = SHOWN_JSON_CHARS) -> str:
    """The text, cut at ``limit``, saying how much more there is (``total_chars``: the length of the
    whole value when the database already cut it)."""
    text = "" if value is None else str(value)
    total = max(total_chars or 0, len(text))
    if total <= limit and len(text) == total:
        return text
    shown = text[:limit]
    return f"{shown}\n… {total - len(shown):,} more characters in the session's JSONL line"


def when(value: datetime | None) -> str:
    """A time as UTC to the second (what the tables store is ``timestamptz``)."""
    if value is None:
        return ""
    if value.tzinfo is not None:
        value = value.astimezone(UTC)
    return value.strftime("%Y-%m-%d %H:%M:%S UTC")


def duration(start: datetime | None, end: datetime | None) -> str:
    if start is None or end is None:
        return ""
    seconds = (end - start).total_seconds()
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min"


def number(value: Any) -> str:
    if value is None or value == "":
        return ""
    try:
        return f"{int(value):,}"
    except (TypeError, ValueError):
        return str(value)


@dataclass(frozen=True, slots=True)
class Bar:
    step_id: int
    phase: str
    x: float
    """Start, in percent of the session's span."""
    width: float
    label: str


@dataclass(frozen=True, slots=True)
class Timeline:
    bars: list[Bar]
    span_ms: float


def _time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


def timeline(steps: Sequence[Mapping[str, Any]]) -> Timeline | None:
    """Each step's ``started_at`` .. ``finished_at`` (its metadata) as bars over the session's span;
    None when no step carries both times."""
    spans: list[tuple[Mapping[str, Any], datetime, datetime]] = []
    for step in steps:
        meta = step.get("metadata")
        if not isinstance(meta, Mapping):
            continue
        start, end = _time(meta.get("started_at")), _time(meta.get("finished_at"))
        if start is not None and end is not None and end >= start:
            spans.append((step, start, end))
    if not spans:
        return None
    first = min(s for _, s, _ in spans)
    last = max(e for _, _, e in spans)
    span_ms = max((last - first).total_seconds() * 1000, 0.001)
    bars = []
    for step, start, end in spans:
        meta = step["metadata"]
        x = (start - first).total_seconds() * 1000 / span_ms * 100
        width = max((end - start).total_seconds() * 1000 / span_ms * 100, 0.4)
        ms = (end - start).total_seconds() * 1000
        bars.append(
            Bar(
                int(step["step_id"]),
                str(meta.get("phase") or ""),
                round(x, 3),
                round(min(width, 100 - x + 0.4), 3),
                f"step {step['step_id']} {meta.get('phase') or ''}: {ms:.0f} ms",
            )
        )
    return Timeline(bars, span_ms)


@dataclass(frozen=True, slots=True)
class Chart:
    """A line chart as SVG polyline points in a 0..width x 0..height box (y grows down)."""

    points: str
    peak: float


def chart(values: Sequence[float], width: int = 600, height: int = 80) -> Chart:
    peak = max(values, default=0.0)
    if not values:
        return Chart("", 0.0)
    scale = height / peak if peak > 0 else 0.0
    step = width / max(len(values) - 1, 1)
    points = " ".join(f"{i * step:.1f},{height - v * scale:.1f}" for i, v in enumerate(values))
    return Chart(points, peak)
