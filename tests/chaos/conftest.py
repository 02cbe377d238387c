"""The bench package lives at the repository root, which is not installed: put it on sys.path.

(`python -m pytest` from the root has it already; `.venv/bin/pytest` does not.)
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = str(Path(__file__).resolve().parents[2])
if REPO not in sys.path:
    sys.path.insert(0, REPO)
