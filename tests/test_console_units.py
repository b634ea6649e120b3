"""The console's pure pieces, without services: filters and their SQL, keyset pages, rates, the step
timeline and chart, URLs, and escaping of whatever a task or an adapter put in a page."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import jinja2
import pytest

from console import ConsoleSettings, _queries, _render
from console._serve import url_of

TEMPLATES = Path(__file__).resolve().parents[1] / "console" / "templates"


def test_filter_numbers_its_parameters_after_the_limit():
    """Each filter value is a numbered parameter, never text in the SQL, numbered after the limit."""
    flt = _queries.SessionFilter(q="t-1", status="failed", attempt=2)
    where, params = flt.where(first_param=2)
    assert where == "(task_id = $2 OR adapter_session_id = $2) AND status = $3 AND attempt = $4"
    assert params == ["t-1", "failed", 2]
    assert "t-1" not in where


def test_filter_from_a_query_string_ignores_what_does_not_parse():
    """A bad attempt or time narrows nothing instead of failing the page; text is trimmed."""
    flt = _queries.SessionFilter.from_query(
        {"q": "  demo-1 ", "attempt": "x", "since": "not a time", "until": "2026-11-30T10:00", "status": ""}
    )
    assert flt.q == "demo-1"
    assert flt.attempt is None
    assert flt.since is None
    assert flt.status is None
    assert flt.until is not None
    assert flt.until.tzinfo is not None


def test_no_filter_is_true():
    """An empty filter selects everything."""
    assert _queries.SessionFilter().where() == ("TRUE", [])


@pytest.mark.parametrize(
    ("direction", "keyset", "order"),
    [(None, "", "DESC"), ("older", "s.id < $3", "DESC"), ("newer", "s.id > $3", "ASC")],
)
def test_pages_are_keyset_not_offset(direction, keyset, order):
    """Paging compares ids (the keyset parameter follows the filter's), never OFFSET."""
    sql = _queries.list_sql("status = $2", 1, direction)
    assert "OFFSET" not in sql.upper()
    assert sql.endswith(f"ORDER BY s.id {order} LIMIT $1")
    assert keyset in sql


@pytest.mark.parametrize(
    ("direction", "keyset", "order"),
    [
        (None, "", "DESC"),
        ("older", "(s.created_at, s.id) < ((SELECT created_at FROM sessions WHERE id = $4), $4)", "DESC"),
        ("newer", "(s.created_at, s.id) > ((SELECT created_at FROM sessions WHERE id = $4), $4)", "ASC"),
    ],
)
def test_time_range_pages_are_keyset_on_created_at(direction, keyset, order):
    """Narrowed to a time range, a list is ordered (and paged) by (created_at, id), so PostgreSQL walks
    the range in the created_at index instead of the primary key from the newest session."""
    sql = _queries.list_sql("created_at >= $2 AND created_at < $3", 2, direction, by_time=True)
    assert "OFFSET" not in sql.upper()
    assert sql.endswith(f"ORDER BY s.created_at {order}, s.id {order} LIMIT $1")
    assert keyset in sql


def test_parse_id_takes_digits_only():
    """Keyset ids are bounded digits; anything else is no id."""
    assert _queries.parse_id("123") == 123
    assert _queries.parse_id("-1") is None
    assert _queries.parse_id("1; DROP TABLE sessions") is None
    assert _queries.parse_id("9" * 11) is None


def test_bucket_rates_fill_missing_buckets_with_zero():
    """Counts per bucket become per-second rates over the window, oldest first, gaps as zero."""
    assert _queries.bucket_rates({98: 20, 100: 5}, 100, 4, 10) == [0.0, 2.0, 0.0, 0.5]


def _step(step_id: int, phase: str, start_ms: int, end_ms: int) -> dict[str, object]:
    base = datetime(2026, 11, 30, tzinfo=UTC)
    return {
        "step_id": step_id,
        "metadata": {
            "phase": phase,
            "started_at": (base + timedelta(milliseconds=start_ms)).isoformat(),
            "finished_at": (base + timedelta(milliseconds=end_ms)).isoformat(),
        },
    }


def test_timeline_places_steps_on_the_session_span():
    """Bars start where their step started, in percent of the whole span; odd metadata is skipped."""
    steps = [_step(0, "plan", 0, 100), _step(1, "execute", 100, 900), _step(2, "synthesize", 900, 1000)]
    steps.append({"step_id": 3, "metadata": "not a mapping"})
    line = _render.timeline(steps)
    assert line is not None
    assert line.span_ms == pytest.approx(1000)
    assert [(b.step_id, b.phase, b.x) for b in line.bars] == [
        (0, "plan", 0),
        (1, "execute", 10),
        (2, "synthesize", 90),
    ]
    assert line.bars[1].width == pytest.approx(80)


def test_timeline_is_none_without_times():
    """No step with both times: no timeline (the page leaves it out)."""
    assert _render.timeline([{"step_id": 1, "metadata": {"phase": "plan"}}]) is None


def test_chart_scales_to_the_peak():
    """The highest value touches the top of the box, zero the bottom."""
    chart = _render.chart([0.0, 5.0, 2.5], width=100, height=80)
    assert chart.peak == 5.0
    assert chart.points == "0.0,80.0 50.0,0.0 100.0,40.0"


def test_console_listens_on_loopback_by_default(monkeypatch):
    """Without settings the console binds 127.0.0.1; a wildcard bind is shown as a loopback URL."""
    monkeypatch.delenv("CONSOLE_HOST", raising=False)
    assert ConsoleSettings().host == "127.0.0.1"
    assert ConsoleSettings().requeue_enabled is False
    assert url_of("0.0.0.0", 8070)  # noqa: S104 == "http://127.0.0.1:8070/"
    assert url_of("::1", 80) == "http://[::1]:80/"


def _env() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True, undefined=jinja2.StrictUndefined
    )
    _render.install(env)
    return env


EVIL = '<script>alert("x")</script><img src=x onerror=alert(1)>'


def test_session_page_escapes_everything_an_agent_wrote():
    """Task text, plan, outputs, traces, events, errors and the answer are text on the page, not HTML."""
    session = {
        "id": 7,
        "task": EVIL,
        "task_chars": len(EVIL),
        "final_answer_chars": len(EVIL),
        "status": "failed",
        "metadata": {"adapter": EVIL},
        "final_answer": EVIL,
        "created_at": None,
        "completed_at": None,
        "stored_at": None,
        "adapter_session_id": EVIL,
        "adapter_usage": {EVIL: 1},
        "adapter_events": [],
        "task_id": EVIL,
        "attempt": 1,
        "steps_expected": 1,
        "export_file": EVIL,
    }
    step = {
        "step_id": 1,
        "trace": EVIL,
        "output": EVIL,
        "trace_chars": len(EVIL),
        "output_chars": len(EVIL),
        "attempts": 1,
        "adapter_usage": {"calls": 1},
        "metadata": {"phase": EVIL, "status": EVIL, "description": EVIL, "error": EVIL},
        "adapter_events": [{"tool": EVIL}],
    }
    detail = _queries.SessionDetail(
        session,
        [step],
        1,
        {"steps": [{"description": EVIL, "depends_on": [EVIL]}]},
        [],
        None,
        [{"problem": EVIL, "reason": EVIL, "seq": 1, "kind": None, "occurrences": 1, "last_seen": None}],
    )
    html = (
        _env()
        .get_template("session.html")
        .render(
            d=detail,
            timeline=None,
            prefix=EVIL,
            path="/sessions/7",
            requeue_enabled=False,
            static=lambda n: n,
        )
    )
    assert "<script>" not in html.replace('<script src="console.js" defer></script>', "")
    assert "<img" not in html
    assert "&lt;script&gt;alert(" in html


def test_clip_says_how_much_the_database_left_out():
    """A text PostgreSQL cut to the page's limit ends with how many characters the JSONL line still has."""
    assert _render.clip("abc", 3) == "abc"
    cut = _render.clip("a" * 10, 1_000_010, limit=10)
    assert cut.startswith("a" * 10)
    assert "1,000,000 more characters" in cut
    assert "more characters" in _render.clip("b" * 30, None, limit=10)


async def test_overview_readings_are_shared_and_renewed_in_the_background(monkeypatch):
    """Only the first request waits for a reading; a stale one is served at once while one renewal runs,
    and a slow reading stretches the interval to ten times its duration."""
    import asyncio

    from console import _overview

    clock = [1000.0]
    monkeypatch.setattr("console._overview.time.time", lambda: clock[0])
    reads: list[float] = []
    release = asyncio.Event()

    async def read() -> _overview.Overview:
        reads.append(clock[0])
        if len(reads) > 1:
            await release.wait()
        return _overview.Overview(clock[0], None, None, None, [], None)

    cache = _overview.OverviewCache(read, min_age_s=5.0)
    first = await cache.get()
    assert first.read_at == 1000.0
    assert (await cache.get()) is first
    clock[0] += 6.0  # stale: served at once, one renewal starts
    assert (await cache.get()) is first
    assert (await cache.get()) is first
    await asyncio.sleep(0)
    assert len(reads) == 2
    release.set()
    await asyncio.sleep(0.01)
    assert (await cache.get()).read_at == 1006.0
    monkeypatch.setattr(cache, "_last_duration_s", 3.0)
    assert cache.interval_s == 30.0
    await cache.close()
    await cache.close()
