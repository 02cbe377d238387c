"""Overlay-removal quality on ground truth: the table for bench/report.md.

    python -m bench.quality            # full size (720p), prints and appends to bench/report.md
    python -m bench.quality --small    # the clip the tests use

See worker/media/quality.py for the clips, the methods and the metrics.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from worker.media.quality import OPACITY, evaluate_h264, evaluate_no_codec, make_case

REPORT = Path(__file__).with_name("report.md")


def run(small: bool) -> tuple[str, dict]:
    """Evaluate every case; return (markdown table, raw scores)."""
    n, h, w, logo_h = (48, 144, 256, 24) if small else (96, 720, 1280, 64)
    results: dict = {}
    lines = [
        "| clip | codec | method | PSNR dB | SSIM | flicker |",
        "|---|---|---|---:|---:|---:|",
    ]
    with tempfile.TemporaryDirectory(prefix="spool-quality-") as tmp:
        for kind in ("static", "jumping"):
            case = make_case(kind, n, h, w, logo_h=logo_h)
            for codec, fn in (
                ("none", evaluate_no_codec),
                ("h264", lambda c: evaluate_h264(c, Path(tmp))),
            ):
                rows = fn(case)
                results[(kind, codec)] = rows
                for method, s in rows.items():
                    lines.append(
                        f"| {kind} | {codec} | {method} | {s['psnr']:.2f} | "
                        f"{s['ssim']:.4f} | {s['flicker']:.3f} |"
                    )
    return "\n".join(lines), results


def main(argv: list[str] | None = None) -> None:
    """Print the quality table and append it to bench/report.md."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="the small clip the tests use")
    ap.add_argument("--no-report", action="store_true", help="do not append to bench/report.md")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    table, _ = run(args.small)
    size = "48 frames 256x144, logo 72x24" if args.small else "96 frames 1280x720, logo 192x64"
    text = (
        f"\n## Overlay removal quality ({time.strftime('%Y-%m-%d %H:%M')} UTC)\n\n"
        f"`python -m bench.quality{' --small' if args.small else ''}` — {size}, opacity "
        f"{OPACITY}, scores on the mark's pixels vs the clean clip "
        f"({time.perf_counter() - t0:.0f} s).\n\n{table}\n"
    )
    print(text)
    if not args.no_report:
        with REPORT.open("a") as f:
            f.write(text)


if __name__ == "__main__":
    main()
