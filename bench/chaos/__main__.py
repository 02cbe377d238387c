"""`python -m bench.chaos`: one chaos run; prints the summary, exits 1 on any violation.

    python -m bench.chaos                              # the full run (make chaos)
    python -m bench.chaos --jobs 300 --duration-s 40   # the size `make test` runs
    python -m bench.chaos --json                       # the report as JSON on stdout

With TEST_DATABASE_URL set (or --database-url), that Postgres is used and the
Postgres restarts are skipped (the summary says so).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys

from bench.chaos.run import ChaosConfig, format_report, run_chaos


def build_parser() -> argparse.ArgumentParser:
    d = ChaosConfig()
    p = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__.split("\n")[0])
    p.add_argument("--jobs", type=int, default=d.jobs, help=f"jobs to submit (default {d.jobs})")
    p.add_argument(
        "--workers", type=int, default=d.workers, help=f"worker processes (default {d.workers})"
    )
    p.add_argument(
        "--slots", type=int, default=d.slots, help=f"slots per worker (default {d.slots})"
    )
    p.add_argument(
        "--replicas", type=int, default=d.replicas, help=f"control replicas (default {d.replicas})"
    )
    p.add_argument(
        "--duration-s",
        type=float,
        default=d.duration_s,
        help=f"seconds of traffic and faults (default {d.duration_s:g})",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=d.seed,
        help=f"seed of the job mix and fault plan (default {d.seed})",
    )
    p.add_argument(
        "--watch-fraction",
        type=float,
        default=d.watch_fraction,
        help="fraction of jobs with a live watcher",
    )
    p.add_argument("--max-faults", type=int, default=d.max_faults, help="at most this many faults")
    p.add_argument(
        "--database-url",
        default=os.environ.get("TEST_DATABASE_URL", ""),
        help="use this Postgres (no restarts); default: an embedded one",
    )
    p.add_argument("--keep-dir", action="store_true", help="keep the run dir (logs, markers)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("-v", "--verbose", action="store_true", help="log each fault as it happens")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.replicas < 2 or args.workers < 1 or args.jobs < 1:
        print("need at least 2 replicas, 1 worker and 1 job", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.verbose:
        logging.getLogger("spool.chaos").setLevel(logging.INFO)
    cfg = ChaosConfig(
        jobs=args.jobs,
        workers=args.workers,
        replicas=args.replicas,
        slots=args.slots,
        duration_s=args.duration_s,
        seed=args.seed,
        watch_fraction=args.watch_fraction,
        database_url=args.database_url,
        max_faults=args.max_faults,
        keep_dir=args.keep_dir,
    )
    report = asyncio.run(run_chaos(cfg))
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print(format_report(report))
    return 1 if report["violations"]["total"] else 0


if __name__ == "__main__":
    sys.exit(main())
