"""``python -m bench --smoke``: every row measured against the real services, and the report it renders."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench._baselines import CELERY_NAME, DRAMATIQ_NAME
from bench._ceilings import consume_name, copy_name, publish_name
from bench._console import row_names as console_row_names
from bench._cpu import PARTS, cpu_name
from bench._e2e import e2e_name
from bench._inflight import inflight_name
from bench._ingest import RECORDS_NAME, SESSIONS_NAME
from bench._memory import ingestor_rss_name, worker_rss_name
from bench._report import Machine, Result, combine_runs, render
from bench._samework_runs import CELERY_SAME_NAME, DRAMATIQ_SAME_NAME
from bench._sessions import RECORDS_PER_SESSION, check_envelopes, envelopes, sessions_for
from bench._steady import CPU_WHAT, steady_name
from bench._suite import RSS_LATENCY_S, SMOKE, Context, report, run_suite
from bench._taskleg import BUSY_CONCURRENCY, taskleg_name, telemetry_name
from schemas import decode_telemetry_batch

EXPECTED_ROWS = [
    publish_name("quorum"),
    consume_name("quorum"),
    publish_name("classic"),
    consume_name("classic"),
    copy_name(logged=False),
    copy_name(logged=True),
    CELERY_NAME,
    DRAMATIQ_NAME,
    taskleg_name(1),
    telemetry_name(1),
    taskleg_name(2),
    telemetry_name(2),
    taskleg_name(1, "classic"),
    taskleg_name(1, concurrency=BUSY_CONCURRENCY),
    e2e_name(2, 0.0, "throughput"),
    e2e_name(2, 0.0, "p50"),
    e2e_name(2, 0.0, "p99"),
    CELERY_SAME_NAME,
    DRAMATIQ_SAME_NAME,
    steady_name("p50"),
    steady_name("p99"),
    steady_name("achieved"),
    steady_name("target"),
    *(cpu_name(part, CPU_WHAT) for part in PARTS),
    inflight_name(SMOKE.inflight_concurrency, SMOKE.inflight_latency_s),
    worker_rss_name(SMOKE.inflight_concurrency, SMOKE.inflight_latency_s),
    RECORDS_NAME,
    SESSIONS_NAME,
    worker_rss_name(SMOKE.rss_concurrency, RSS_LATENCY_S),
    ingestor_rss_name(SMOKE.backlog_records),
    *console_row_names(SMOKE.console_sessions),
]


def _machine() -> Machine:
    return Machine(
        cores=2,
        ram_gib=4.0,
        cpu="test cpu",
        os="Linux",
        python="CPython 3.11",
        rabbitmq="3.13.0",
        postgres="PostgreSQL 16",
        packages={"aio-pika": "9.4"},
        date="2026-01-01 00:00 UTC",
        load_before="0.00 0.00 0.00",
    )


def test_render_rows_ratios_and_medians() -> None:
    """render() has a table row per result, a ratio per baseline pair, and combine_runs() takes medians."""
    runs = [
        [Result("base", "tasks/s", 100.0), Result("ours", "tasks/s", 150.0, baseline="base", notes="a|b")],
        [Result("base", "tasks/s", 300.0), Result("ours", "tasks/s", 180.0, baseline="base", notes="a|b")],
        [Result("base", "tasks/s", 200.0), Result("ours", "tasks/s", 170.0, baseline="base", notes="a|b")],
    ]
    results = combine_runs(runs)
    assert [(r.name, r.value) for r in results] == [("base", 200.0), ("ours", 170.0)]
    text = render(results, _machine(), extra_ratios=[("base", "ours"), ("ours", "missing")])
    assert "| ours | 170 | tasks/s | 0.85x base | median of 3 runs (150, 180, 170); run 1: a\\|b |" in text
    assert "- ours vs base: 0.85x" in text
    assert "- base vs ours: 1.18x" in text
    assert "missing" not in text
    assert "- RabbitMQ: 3.13.0" in text


def test_a_target_is_judged_on_the_value_shown() -> None:
    """A row with a target opens its notes with the verdict on its value: the median of the runs, not
    run 1's."""
    runs = [
        [Result("page p95", "ms", v, notes=f"run {i}", at_most=100.0)] for i, v in enumerate((150, 20, 30))
    ]
    (row,) = combine_runs(runs)
    assert row.value == 30
    line = (
        "| page p95 | 30.0 | ms |  | target <= 100 ms: met; median of 3 runs (150, 20.0, 30.0); "
        "run 1: run 0 |"
    )
    assert line in render([row], _machine())
    slow = Result("page p95", "ms", 101.0, at_most=100.0)
    assert "| target <= 100 ms: NOT met |" in render([slow], _machine())
    assert Result("rate", "tasks/s", 1.0).verdict() == ""


def test_rate_targets_are_judged_on_the_value_and_on_the_ratio_to_the_baseline() -> None:
    """A rate target (at least N/s) and a ratio target (at least Nx its baseline, both medians of the same
    run) each say met or NOT met in the row's notes."""
    base = Result("celery", "tasks/s", 2000.0)
    fast = Result("ours", "tasks/s", 2500.0, baseline="celery", at_least=2400.0, at_least_ratio=1.0)
    slow = Result("ours", "tasks/s", 1900.0, baseline="celery", at_least=2400.0, at_least_ratio=1.0)
    assert (
        "| ours | 2,500 | tasks/s | 1.25x celery | target >= 2,400 tasks/s: met; target >= 1x celery: met |"
        in render([base, fast], _machine())
    )
    assert "| 0.95x celery | target >= 2,400 tasks/s: NOT met; target >= 1x celery: NOT met |" in render(
        [base, slow], _machine()
    )
    share = Result("ingestor", "records/s", 30_000.0, baseline="copy", at_least_ratio=0.2)
    assert "target >= 0.2x copy: NOT met" in render([Result("copy", "rows/s", 160_000.0), share], _machine())
    assert "target" not in render([share], _machine())  # no baseline row, no ratio verdict


def test_generated_telemetry_is_valid_and_in_session_order() -> None:
    """The ingestor rows' envelopes are encode_telemetry_batch's bytes, one kind each, within the worker's
    limits, and every session's records arrive opened -> steps -> closed."""
    check_envelopes()
    n = sessions_for(5000)
    seen: dict[str, list[int]] = {}
    for kind, body in envelopes(n, "t"):
        assert len(body) <= 256 * 1024 + 64
        batch = decode_telemetry_batch(body)
        assert batch.kind == kind
        assert not batch.rejects
        assert 1 <= len(batch.records) <= 500
        for record in batch.records:
            seen.setdefault(record.adapter_session_id, []).append(record.seq)
    assert len(seen) == n
    assert all(seqs == list(range(RECORDS_PER_SESSION)) for seqs in seen.values())


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_smoke_benchmark_measures_every_row(
    amqp_url: str, admin_database_url: str, tmp_path: Path
) -> None:
    """The smoke suite yields every row with a positive value and renders a BENCHMARKS-style report."""
    ctx = Context(amqp_url, admin_database_url, SMOKE, tmp_path / "logs")
    results, machine = await run_suite(ctx)
    assert [r.name for r in results] == EXPECTED_ROWS
    assert all(r.value > 0 for r in results), results
    out = tmp_path / "BENCHMARKS.md"
    out.write_text(report(results, machine, sizes=SMOKE))
    text = out.read_text()
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(EXPECTED_ROWS)
    for name in EXPECTED_ROWS:
        assert any(line.startswith(f"| {name} |") for line in table), name
    assert f"{taskleg_name(1)} vs {CELERY_NAME}: " in text
    assert f"{taskleg_name(1)} vs {DRAMATIQ_NAME}: " in text
    assert f"{RECORDS_NAME} vs {copy_name(logged=True)}: " in text
    assert f"{e2e_name(2, 0.0, 'throughput')} vs {taskleg_name(2)}: " in text
    assert f"{e2e_name(2, 0.0, 'throughput')} vs {CELERY_NAME}: " in text
    assert f"{e2e_name(2, 0.0, 'throughput')} vs {CELERY_SAME_NAME}: " in text
    assert f"{e2e_name(2, 0.0, 'throughput')} vs {DRAMATIQ_SAME_NAME}: " in text
    assert f"{steady_name('achieved')} vs {steady_name('target')}: " in text
    assert "## Machine" in text
    assert machine.cores > 0
