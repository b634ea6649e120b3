"""``python -m bench [--smoke] [--out BENCHMARKS.md]``: ceilings, baselines and atlas task-leg rates.

Prints a markdown report (rates, ratios against the baselines of the same run, the machine) and writes
it to ``--out`` (default ``BENCHMARKS.md`` for a full run; a smoke run writes only where told). Uses
$AMQP_URL and $DATABASE_URL (a server where it may create and drop scratch databases).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
from pathlib import Path

from atlas_common import configure_logging
from bench._harness import unique
from bench._services import HOW_TO_GET_SERVICES, ROOT, broker_answers, database_answers
from bench._suite import FULL, GROUPS, SMOKE, Context, report, run_suite


async def main_async(args: argparse.Namespace) -> int:
    configure_logging(level="WARNING", log_format="console")  # the report is the output, not migration logs
    amqp_url = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    database_url = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    problems = [
        p for p in await asyncio.gather(broker_answers(amqp_url), database_answers(database_url)) if p
    ]
    if problems:
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        print(HOW_TO_GET_SERVICES, file=sys.stderr)
        return 2
    sizes = SMOKE if args.smoke else FULL
    if args.tasks is not None:
        sizes = dataclasses.replace(sizes, tasks=args.tasks)
    ctx = Context(amqp_url, database_url, sizes, ROOT / "var" / "bench" / unique("run"))
    print(f"bench: logs in {ctx.logdir}", file=sys.stderr, flush=True)
    results, machine = await run_suite(ctx, only=args.only)
    text = report(results, machine, sizes=sizes)
    print(text)
    out: Path | None = args.out if args.out is not None else (None if args.smoke else ROOT / "BENCHMARKS.md")
    if out is not None:
        await asyncio.to_thread(out.write_text, text)
        print(f"bench: wrote {out}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (< 60 s), for CI")
    parser.add_argument(
        "--out", type=Path, help="write the report here (default: BENCHMARKS.md, not for --smoke)"
    )
    parser.add_argument("--only", nargs="+", choices=list(GROUPS), help="run only these groups")
    parser.add_argument("--tasks", type=int, help="override N of the task-leg rows")
    return asyncio.run(main_async(parser.parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
