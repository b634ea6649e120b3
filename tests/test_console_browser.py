"""The web console driven as a person uses it, in headless Chromium (Debian's ``chromium``, through
Playwright, no browser download), against a real pipeline run on RabbitMQ and PostgreSQL.

Set ``ATLAS_CONSOLE_SCREENSHOTS=<dir>`` to save the overview and a session page there (the README's
pictures under ``docs/`` come from this test).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import pytest

from atlas_common import DEAD_TASK_ROUTING_KEY, dead_letter_headers
from migrations import apply_migrations
from producer import demo_tasks
from schemas import TaskMessage
from tests._pipeline import ROOT, PipelineStack

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EVIL_TASK = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2"> & friends'
TASKS = 12
SUCCEEDED_CELL = '#sessions-by-status [data-status="succeeded"]'


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None or not Path(found).exists():
        reason = "Debian's chromium is not installed (.ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return found


@dataclass
class Console:
    url: str
    stack: PipelineStack
    proc: subprocess.Popen[bytes]
    run_id: str
    evil_id: str

    def at(self, path: str) -> str:
        return self.url.rstrip("/") + path


async def _wait_stored(database_url: str, count: int, *, timeout_s: float = 90.0) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            done = await conn.fetchval(
                "SELECT count(*) FROM sessions WHERE status = 'succeeded' AND export_file IS NOT NULL"
            )
            if done >= count:
                return
            assert time.monotonic() < deadline, f"{done} of {count} sessions stored after {timeout_s}s"
            await asyncio.sleep(0.2)
    finally:
        await conn.close()


def _start_console(stack: PipelineStack) -> tuple[subprocess.Popen[bytes], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "console"],
        env=stack.env(CONSOLE_PORT="0", CONSOLE_REQUEUE_ENABLED="true", CONSOLE_REFRESH_S="1"),
        stdout=subprocess.PIPE,
        stderr=(stack.workdir / "console.log").open("wb"),
        cwd=ROOT,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()  # "console: <url>", printed once it listens
    assert line.startswith("console: "), f"console did not start: {line!r}"
    stack.procs.append(proc)
    return proc, line.removeprefix("console: ").strip()


@pytest.fixture(scope="module")
async def console(
    amqp_url: str, make_database: Any, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Console]:
    """A finished run (an ingestor, a worker, demo tasks and one task whose text is HTML) and a console
    on it, with requeueing enabled."""
    _chromium()
    database_url = await make_database()
    await apply_migrations(database_url)
    stack = PipelineStack(
        amqp_url, database_url, f"c{uuid.uuid4().hex[:10]}", tmp_path_factory.mktemp("console")
    )
    try:
        stack.start_ingestor()
        stack.start_worker("w1", "--concurrency", "8", "--demo-latency-s", "0.02")
        run_id = uuid.uuid4().hex[:8]
        evil = TaskMessage(task_id=f"evil-{run_id}", task=EVIL_TASK)
        await stack.submit([*demo_tasks(TASKS, run_id=run_id), evil])
        await _wait_stored(database_url, TASKS + 1)
        proc, url = _start_console(stack)
        yield Console(url, stack, proc, run_id, evil.task_id)
    finally:
        stack.stop_all(signal.SIGTERM, timeout_s=15)
        await stack.delete_topology()


@pytest.fixture(scope="module")
async def browser(console: Console) -> AsyncIterator[Any]:
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        chromium = await p.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"])
        try:
            yield chromium
        finally:
            await chromium.close()


@pytest.fixture
async def page(browser: Any) -> AsyncIterator[Any]:
    context = await browser.new_context(viewport={"width": 1300, "height": 1000})
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("dialog", lambda dialog: errors.append(f"dialog: {dialog.message}"))
    yield page
    await context.close()
    assert errors == [], f"the page ran into: {errors}"


def _screenshot(name: str) -> Path | None:
    where = os.environ.get("ATLAS_CONSOLE_SCREENSHOTS")
    return Path(where) / name if where else None


async def _db(console: Console, sql: str, *args: Any) -> Any:
    conn = await asyncpg.connect(console.stack.database_url)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


async def test_overview_counts_match_the_database(console: Console, page: Any):
    """The overview shows the sessions by status and the ledger as the tables hold them, nothing
    succeeded-but-unstored, and the tasks queue with its consumer."""
    await page.goto(console.url)
    rows = await _db(
        console, "SELECT status, count(*) AS n FROM sessions WHERE task_id IS NOT NULL GROUP BY 1"
    )
    for row in rows:
        shown = await page.locator(f'#sessions-by-status [data-status="{row["status"]}"]').inner_text()
        assert int(shown) == row["n"]
    ledger = await _db(console, "SELECT state, count(*) AS n FROM task_ledger GROUP BY 1")
    for row in ledger:
        assert (
            int(await page.locator(f'#ledger-by-state [data-state="{row["state"]}"]').inner_text())
            == row["n"]
        )
    assert await page.get_by_test_id("unaccounted").inner_text() == "0"
    tasks_row = page.locator(f'#queues tr[data-queue="{console.stack.topology.tasks_queue}"] td')
    assert (await tasks_row.nth(3).inner_text()).strip() == "1"  # one worker consumes
    files = await _db(console, "SELECT count(*) AS n FROM jsonl_files")
    assert await page.locator("#files tbody tr").count() == min(files[0]["n"], 8)
    if (shot := _screenshot("console-overview.png")) is not None:
        await page.screenshot(path=str(shot), full_page=True)


async def test_overview_refreshes_by_itself(console: Console, page: Any):
    """New sessions appear on an open overview without a reload (the page's script swaps the reading)."""
    await page.goto(console.url)
    cell = page.locator(SUCCEEDED_CELL)
    before = int(await cell.inner_text())
    more = list(demo_tasks(3, run_id=f"{console.run_id}-more"))
    await console.stack.submit(more)
    await _wait_stored(console.stack.database_url, before + 3)
    await page.wait_for_function(
        "a => Number(document.querySelector(a.cell)?.textContent) >= a.n",
        arg={"cell": SUCCEEDED_CELL, "n": before + 3},
        timeout=15_000,
    )


async def test_search_a_task_id_and_read_its_trajectory(console: Console, page: Any):
    """Search finds one task; its page shows every step in order (plan, executes, synthesize) as stored,
    the final answer, and a download of exactly its line in the JSONL file."""
    task_id = f"demo-{console.run_id}-0000003"
    await page.goto(console.at("/sessions"))
    await page.locator("header .search input").fill(task_id)
    await page.locator("header .search input").press("Enter")
    await page.wait_for_url("**/sessions?q=*")
    rows = page.locator("#sessions tbody tr[data-session-id]")
    assert await rows.count() == 1
    await rows.first.get_by_role("link", name=task_id).click()
    await page.wait_for_url("**/sessions/*")
    (session,) = await _db(
        console, "SELECT id, final_answer, export_file FROM sessions WHERE task_id = $1", task_id
    )
    steps = await _db(
        console, "SELECT step_id FROM step_results WHERE session_id = $1 ORDER BY step_id", session["id"]
    )
    assert await page.locator("#task-id").inner_text() == task_id
    shown = [
        int(x)
        for x in await page.locator("#steps li.step").evaluate_all("els => els.map(e => e.dataset.stepId)")
    ]
    assert shown == [r["step_id"] for r in steps]
    phases = await page.locator("#steps li.step").evaluate_all("els => els.map(e => e.dataset.phase)")
    assert phases[0] == "plan"
    assert phases[-1] == "synthesize"
    assert set(phases[1:-1]) == {"execute"}
    assert await page.locator("#final-answer").inner_text() == session["final_answer"]
    assert await page.locator("#export-file").inner_text() == session["export_file"]
    async with page.expect_download() as info:
        await page.locator("#download-line").click()
    download = await info.value
    line = await asyncio.to_thread(Path(await download.path()).read_bytes)
    in_file = (console.stack.jsonl_dir / session["export_file"]).read_bytes().splitlines(keepends=True)
    assert line in in_file
    if (shot := _screenshot("console-session.png")) is not None:
        await page.screenshot(path=str(shot), full_page=False)


async def test_html_in_a_task_renders_as_text(console: Console, page: Any):
    """A task text of <script> and <img onerror> shows as those characters and runs nothing, in the
    list and on its page."""
    await page.goto(console.at(f"/sessions?q={console.evil_id}"))
    assert EVIL_TASK[:80] in await page.locator("#sessions td.task").first.inner_text()
    await page.locator("#sessions tbody tr[data-session-id] a").first.click()
    await page.wait_for_url("**/sessions/*")
    assert await page.locator("#task-text").inner_text() == EVIL_TASK
    assert await page.evaluate("window.__pwned") is None
    assert await page.locator("main script, main img").count() == 0


async def test_requeue_a_dead_letter_and_see_it_run(console: Console, page: Any):
    """A dead task is listed with its reason; selecting it, confirming, and it runs: its session is
    stored and the console finds it succeeded."""
    task = TaskMessage(task_id=f"dead-{console.run_id}", task="Summarise the dead-letter runbook.")
    topology = console.stack.topology
    connection = await aio_pika.connect(console.stack.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await topology.declare_dead_letters(channel)
        headers = dead_letter_headers("test: adapter timed out", source="worker", routing_key="task")
        await exchange.publish(
            aio_pika.Message(task.model_dump_json().encode(), message_id=task.task_id, headers=headers),
            DEAD_TASK_ROUTING_KEY,
        )
    await page.goto(console.at("/dead"))
    row = page.locator(f'#dead-letters tr[data-message-id="{task.task_id}"]')
    assert "test: adapter timed out" in await row.inner_text()
    await row.locator("input[type=checkbox]").check()
    await page.locator("#requeue").click()
    await page.wait_for_url("**/dead/confirm")
    assert await page.locator("#confirm-ids").inner_text() == task.task_id
    await page.locator("#confirm").click()
    await page.wait_for_url("**/dead?*")
    assert await page.locator("#requeued").inner_text() == "requeued 1"
    conn = await asyncpg.connect(console.stack.database_url)
    try:
        deadline = time.monotonic() + 60
        while (
            await conn.fetchval(
                "SELECT count(*) FROM sessions WHERE task_id = $1 AND status = 'succeeded' "
                "AND export_file IS NOT NULL",
                task.task_id,
            )
            < 1
        ):
            assert time.monotonic() < deadline, "the requeued task never ran to a stored session"
            await asyncio.sleep(0.2)
    finally:
        await conn.close()
    await page.goto(console.at(f"/sessions?q={task.task_id}"))
    assert await page.locator("#sessions .status").first.inner_text() == "succeeded"
    assert await page.locator(f'#dead-letters tr[data-message-id="{task.task_id}"]').count() == 0


async def test_requeue_is_refused_without_the_confirmation_token(console: Console):
    """A requeue posted without the confirmation page's token, or from another origin, is refused."""
    import aiohttp

    async with aiohttp.ClientSession() as http:
        plain = await http.post(
            console.at("/dead/requeue"), data={"queue": "tasks", "id": "x", "token": "forged"}
        )
        assert plain.status == 403
        other = await http.post(
            console.at("/dead/confirm"),
            data={"queue": "tasks", "id": "x"},
            headers={"Origin": "http://evil.example"},
        )
        assert other.status == 403
