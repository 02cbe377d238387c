"""`spool-control`: run the control plane (`serve`, the default) or only migrate (`migrate`).

Every setting is an environment variable with a flag mirroring it (flags win);
`spool-control --help` lists them all with their defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from control import migrations
from control.config import Settings, convert, settings_fields
from control.embedded import EmbeddedPostgres
from control.logs import configure_logging
from control.server import start_server
from spool import runloop

log = logging.getLogger("spool.control")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-").removesuffix("-s")


def _env_help() -> str:
    lines = ["environment (flags of the same name win):"]
    for f in settings_fields():
        default = f.default if f.default != "" else "(empty)"
        if isinstance(default, bool):
            default = "on" if default else "off"
        lines.append(f"  {f.metadata['env']:<28} {_flag(f.name):<24} default {default}")
        lines.append(f"      {f.metadata['help']}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The command line: every Settings field as a flag, plus the subcommand."""
    parser = argparse.ArgumentParser(
        prog="spool-control",
        description="Spool control plane: the spool.v1 gRPC API on Postgres.",
        epilog=_env_help() + "\n\ncommands:\n  serve    run the control plane (default)\n"
        "  migrate  apply database migrations and exit",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", nargs="?", default="serve", choices=("serve", "migrate"))
    for f in settings_fields():
        kind = f.type if isinstance(f.type, str) else f.type.__name__
        metavar = {
            "bool": "on|off",
            "int": "N",
            "float": "DURATION" if f.name.endswith("_s") else "X",
        }
        parser.add_argument(
            _flag(f.name),
            dest=f.name,
            metavar=metavar.get(kind, "VALUE"),
            help=f"{f.metadata['help']} [{f.metadata['env']}]",
        )
    parser.add_argument(
        "--no-reflection",
        dest="reflection",
        action="store_const",
        const="off",
        help="turn gRPC server reflection off (same as --reflection off)",
    )
    return parser


def settings_from_args(argv: Sequence[str] | None = None) -> tuple[str, Settings]:
    """Parse the command line on top of the environment."""
    parser = build_parser()
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = {}
    try:
        for f in dataclasses.fields(Settings):
            raw = getattr(args, f.name)
            if raw is not None:
                overrides[f.name] = convert(f, raw)
        settings = Settings.from_env(**overrides)
    except ValueError as exc:
        parser.error(str(exc))
    return args.command, settings


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then stop gracefully."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    cp = await start_server(settings, wait_ready=False)
    stopping = asyncio.ensure_future(stop.wait())
    try:
        # Until a signal, or until getting ready failed for good (not a retryable
        # database outage: those are retried while health says NOT_SERVING).
        await asyncio.wait({stopping, cp.ready_task}, return_when=asyncio.FIRST_COMPLETED)
        if cp.ready_task.done() and cp.ready_task.exception() is not None:
            raise cp.ready_task.exception()  # type: ignore[misc]
        await stopping
        log.info("shutting down (grace %.1fs)", settings.shutdown_grace_s)
    finally:
        stopping.cancel()
        await cp.stop(settings.shutdown_grace_s)


def migrate(settings: Settings) -> None:
    """Apply migrations to the configured (or embedded) database."""
    embedded = None
    url = settings.database_url
    if not url:
        embedded = EmbeddedPostgres(Path(settings.data_dir) / "pg")
        embedded.start()
        url = embedded.url()
    try:
        migrations.upgrade_sync(url)
        log.info("database migrated to the latest revision")
    finally:
        if embedded is not None:
            embedded.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `spool-control`."""
    command, settings = settings_from_args(argv)
    configure_logging(settings.log_format, settings.log_level)
    if not settings.auth and settings.host not in ("127.0.0.1", "localhost", "[::1]"):
        log.warning(
            "auth is off and listening on %s: anyone who can reach it may use it", settings.listen
        )
    if command == "migrate":
        migrate(settings)
        return 0
    with contextlib.suppress(KeyboardInterrupt):
        runloop.run(serve(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
