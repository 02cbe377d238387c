"""`make bench`: run the benchmarks and record what they measured, and on what.

    python -m bench                     # dispatch, media, quality, scale, throughput (long)
    python -m bench --quick             # smaller runs of each, 1-2 minutes
    python -m bench --only quality      # one bench (repeatable)

Each bench runs in its own process (`python -m bench.<name> --no-report`), its
output shown as it comes. The run is written to bench/out/report-<date>.md
(gitignored) and copied into bench/report.md as the one "Latest run" section
between the `bench:latest` markers, replaced on every run; the dated sections
the benches append when run on their own are left alone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REPORT = REPO / "bench" / "report.md"
OUT_DIR = REPO / "bench" / "out"
BEGIN = "<!-- bench:latest:begin (written by `python -m bench`; replaced on every run) -->"
END = "<!-- bench:latest:end -->"
_LATEST_RE = re.compile(r"<!-- bench:latest:begin\b.*?-->.*?<!-- bench:latest:end -->", re.S)

#: name -> (arguments of the full run, arguments of --quick)
BENCHES: dict[str, tuple[list[str], list[str]]] = {
    "dispatch": ([], ["--jobs", "60", "--cancels", "10", "--workers", "2"]),
    "media": ([], ["--frames", "72", "--rss-seconds", "10"]),
    "quality": ([], ["--small"]),
    "scale": ([], ["--quick"]),
    "throughput": ([], ["--quick"]),
}


@dataclass
class BenchRun:
    """One bench's process: its command, how long it took, what it printed."""

    name: str
    command: list[str]
    returncode: int
    seconds: float
    stdout: str
    load_before: float

    @property
    def shown_command(self) -> str:
        return "python -m " + " ".join(self.command[2:])


def machine() -> dict[str, str]:
    """What the figures depend on: CPU, memory, Python and the media/ML stack."""
    info = {
        "host": platform.node(),
        "cpu": f"{os.cpu_count()} cores",
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] += f" ({line.split(':', 1)[1].strip()})"
                break
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
        info["memory"] = f"{mem_kb / 1024**2:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    for dist in ("torch", "av", "opencv-python-headless", "grpcio"):
        try:
            info[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            info[dist] = "not installed"
    return info


def run_bench(name: str, args: list[str]) -> BenchRun:
    """Run `python -m bench.<name> --no-report ARGS`, echoing its stdout as it comes."""
    command = [sys.executable, "-m", f"bench.{name}", "--no-report", *args]
    print(f"\n==> python -m bench.{name} {' '.join(['--no-report', *args])}", flush=True)
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    lines = []
    with subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            lines.append(line)
    return BenchRun(name, command, proc.returncode, time.perf_counter() - t0, "".join(lines), load)


def _dispatch_section(figures: dict) -> str:
    """bench.dispatch prints its figures as JSON; the same table it appends on its own."""
    rows = [
        ("dispatch: Submit RPC → Assign received (idle workers)", figures["dispatch"]),
        ("(of which the Submit RPC alone)", figures["submit_rpc"]),
        ("cancel: Cancel RPC → handler sees ctx.cancelled", figures["cancel"]),
    ]
    lines = [
        "| latency | n | p50 ms | p99 ms | mean ms | max ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, s in rows:
        lines.append(
            f"| {label} | {s['n']} | {s['p50_ms']} | {s['p99_ms']} | {s['mean_ms']} "
            f"| {s['max_ms']} |"
        )
    return "\n".join(lines)


def section(run: BenchRun) -> str:
    """The markdown of one bench's run: heading, command, time, then its figures."""
    head = (
        f"### {run.name}\n\n`{run.shown_command}` — {run.seconds:.0f} s"
        f" (load average {run.load_before:.2f} when it started)\n\n"
    )
    if run.returncode != 0:
        tail = "\n".join(run.stdout.splitlines()[-20:])
        body = f"**failed (exit {run.returncode})**; last output:\n\n```\n{tail}\n```"
    elif run.name == "dispatch":
        body = _dispatch_section(json.loads(run.stdout[run.stdout.index("{") :]))
    else:
        # media and quality print the section they would append: keep it from its
        # heading on, one level down.
        text = run.stdout
        start = text.find("\n## ")
        body = text[start + 1 :].strip() if start >= 0 else f"```\n{text.strip()}\n```"
        body = re.sub(r"^## ", "#### ", body, flags=re.M)
    return head + body + "\n"


def render(runs: list[BenchRun], info: dict[str, str], argv: list[str], when: str) -> str:
    """The whole run as markdown (a `## Latest run` section)."""
    software = ", ".join(
        f"{k} {info[k]}" for k in ("python", "torch", "av", "opencv-python-headless", "grpcio")
    )
    head = (
        f"## Latest run ({when})\n\n"
        f"`python -m bench{' ' + ' '.join(argv) if argv else ''}`\n\n"
        f"- machine: {info['host']}, {info['cpu']}, {info.get('memory', '?')} RAM, {info['os']}\n"
        f"- software: {software}\n\n"
    )
    return head + "\n".join(section(r) for r in runs)


def replace_latest(report: str, block: str) -> str:
    """`report` with the text between the markers replaced by `block` (appended if absent)."""
    wrapped = f"{BEGIN}\n{block.rstrip()}\n{END}"
    if _LATEST_RE.search(report):
        return _LATEST_RE.sub(lambda _: wrapped, report, count=1)
    return report.rstrip("\n") + "\n\n" + wrapped + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the chosen benches, write bench/out/report-<date>.md, update bench/report.md."""
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    ap.add_argument("--only", action="append", choices=list(BENCHES), help="run only this bench")
    ap.add_argument("--quick", action="store_true", help="smaller runs (1-2 minutes in all)")
    ap.add_argument("--report", type=Path, default=REPORT, help="the report to update")
    ap.add_argument("--out-dir", type=Path, default=OUT_DIR, help="where the dated copy goes")
    ap.add_argument("--no-report", action="store_true", help="do not touch --report")
    args = ap.parse_args(argv)

    names = [n for n in BENCHES if not args.only or n in args.only]
    info = machine()
    runs = [run_bench(n, BENCHES[n][1] if args.quick else BENCHES[n][0]) for n in names]
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    block = render(runs, info, argv, when)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    dated = args.out_dir / f"report-{time.strftime('%Y-%m-%d-%H%M', time.gmtime())}.md"
    dated.write_text(f"# Benchmarks\n\n{block}")
    print(f"\nwrote {dated}")
    if not args.no_report:
        old = args.report.read_text() if args.report.exists() else "# Benchmark report\n"
        args.report.write_text(replace_latest(old, block))
        print(f"updated the Latest run section of {args.report}")
    failed = [r.name for r in runs if r.returncode != 0]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
