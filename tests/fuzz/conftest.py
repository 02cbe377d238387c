"""Hypothesis profiles for the fuzz tests: a small run by default, a bigger one with SPOOL_SLOW=1.

Examples are generated against one real control plane per test (the shared
`control` fixture is function scoped, so its health check is suppressed), with
no deadline (this machine is loaded) and no example database on disk.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

SLOW = os.environ.get("SPOOL_SLOW", "") == "1"

settings.register_profile(
    "spool-fuzz",
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.function_scoped_fixture,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
        HealthCheck.large_base_example,
    ],
)
settings.load_profile("spool-fuzz")
