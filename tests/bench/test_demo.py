"""`make demo` end to end: a private control plane and worker, the real CLI, PSNR improved."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import demo


def test_demo_removes_the_overlay(
    database_url: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "demo"
    code = demo.main(
        ["--local", "--database-url", database_url, "--seconds", "3", "--output", str(out)]
    )
    printed = capfd.readouterr()
    assert code == 0, printed.out + printed.err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["frames"] == 72
    assert summary["psnr_after_db"] >= summary["psnr_before_db"] + 15
    for name in ("input", "template", "ground_truth", "result", "report", "compare"):
        assert Path(summary[name]).is_file(), name
    # The user is shown the commands, the progress bar's end and the summary.
    assert "$ spool submit video.remove_overlay --input" in printed.out
    assert "--watch --output" in printed.out
    assert "72/72 frames" in printed.err
    assert "dB before →" in printed.out
