"""spool.runloop: which event loop the processes run on (SPOOL_EVENT_LOOP)."""

from __future__ import annotations

import asyncio

import pytest

from spool import runloop


def test_auto_takes_uvloop_when_installed_and_asyncio_when_asked() -> None:
    pytest.importorskip("uvloop")
    assert runloop.loop_name("auto") == "uvloop"
    assert runloop.loop_name("asyncio") == "asyncio"


def test_a_wrong_choice_is_refused() -> None:
    with pytest.raises(ValueError, match="SPOOL_EVENT_LOOP"):
        runloop.loop_name("gevent")


def test_run_runs_the_coroutine_on_the_chosen_loop() -> None:
    async def which() -> str:
        return type(asyncio.get_running_loop()).__module__

    assert runloop.run(which(), "asyncio").startswith("asyncio")
    if runloop.loop_name("auto") == "uvloop":
        assert runloop.run(which(), "uvloop").startswith("uvloop")
