"""``./atlas run`` (bench.mainjob) end to end on a scratch database: every task stored, and the summary
ends with the console's URL for the run, which served the run's sessions while the job ran."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests._pipeline import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_main_job_prints_the_console_url_of_the_run(amqp_url: str, migrated_database: str):
    """A 20-task main job exits 0, every session succeeded, and names a console URL narrowed to the run."""
    env = dict(os.environ, AMQP_URL=amqp_url, DATABASE_URL=migrated_database, CONSOLE_PORT="0")
    done = subprocess.run(
        [sys.executable, "-m", "bench.mainjob", "--tasks", "20", "--no-keep-console"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "sessions        succeeded 20" in done.stdout
    match = re.search(
        r"^  console +(http://127\.0\.0\.1:(\d+)/sessions\?since=\S+&until=\S+)$", done.stdout, re.MULTILINE
    )
    assert match is not None, done.stdout
    assert int(match.group(2)) > 0
    run_dir = re.search(r"logs in (\S+)", done.stdout)
    assert run_dir is not None
    console_log = (Path(run_dir.group(1)) / "console.log").read_text()
    assert "console.listening" in console_log
    assert "Traceback" not in console_log
