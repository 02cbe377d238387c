"""`make bench`: the Latest run section of bench/report.md is replaced, nothing else is touched."""

from __future__ import annotations

from pathlib import Path

import bench.__main__ as bench_main

OTHER = "# Benchmark report\n\n## Dispatch and cancel latency (2026-11-22)\n\n| a | b |\n"


def test_replace_latest_appends_once_then_replaces() -> None:
    first = bench_main.replace_latest(OTHER, "## Latest run (1)\n\nold figures\n")
    assert first.startswith(OTHER.rstrip("\n"))
    assert first.count(bench_main.BEGIN) == 1 and "old figures" in first
    second = bench_main.replace_latest(first + "\n## Added by hand later\n", "## Latest run (2)\n")
    assert second.count(bench_main.BEGIN) == 1 and second.count(bench_main.END) == 1
    assert "old figures" not in second and "## Latest run (2)" in second
    assert second.startswith(OTHER.rstrip("\n")) and second.endswith("## Added by hand later\n")


def test_quick_quality_run_writes_both_reports(tmp_path: Path) -> None:
    report = tmp_path / "report.md"
    report.write_text(OTHER)
    out = tmp_path / "out"
    argv = ["--only", "quality", "--quick", "--report", str(report), "--out-dir", str(out)]
    assert bench_main.main(argv) == 0
    text = report.read_text()
    assert text.startswith(OTHER.rstrip("\n"))
    assert "### quality" in text and "`python -m bench.quality --no-report --small`" in text
    assert "#### Overlay removal without a template: moving marks" in text
    assert "| moving-clean-ui | 320x180 |" in text and "Targets (issue 10)" in text
    assert "- software: python " in text and "torch " in text
    (dated,) = out.glob("report-*.md")
    assert bench_main.BEGIN not in dated.read_text()
    assert "### quality" in dated.read_text()
