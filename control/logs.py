"""Structured logs: one line per record, JSON or key=value, with the request id.

Code logs with the standard `logging` module and passes structured fields as
`extra={"fields": {...}}`; the RPC's request id (from the request-id
interceptor) is added to every record logged while handling that RPC.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from typing import Any

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("spool_request_id", default="")


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    request_id = getattr(record, "request_id", "") or request_id_var.get()
    if request_id:
        fields["request_id"] = request_id
    fields.update(getattr(record, "fields", None) or {})
    return fields


def _timestamp(record: logging.LogRecord) -> str:
    base = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{base}.{int(record.msecs):03d}Z"


class JsonFormatter(logging.Formatter):
    """`{"ts": …, "level": …, "logger": …, "msg": …, <fields>}` per line."""

    def format(self, record: logging.LogRecord) -> str:
        """Render one record as a JSON object."""
        out: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update(_fields(record))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class KeyValueFormatter(logging.Formatter):
    """`<ts> <level> <logger> <msg> key=value …` per line (tracebacks follow)."""

    def format(self, record: logging.LogRecord) -> str:
        """Render one record as text with key=value fields."""
        parts = [_timestamp(record), record.levelname.lower(), record.name, record.getMessage()]
        for key, value in _fields(record).items():
            text = str(value)
            parts.append(f"{key}={json.dumps(text) if ' ' in text or not text else text}")
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def configure_logging(fmt: str = "text", level: str = "INFO") -> None:
    """Send every log record to stderr in `fmt` ("json" or "text")."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # pgserver narrates every initdb/pg_ctl call at INFO; its warnings still show.
    logging.getLogger("pgserver").setLevel(max(root.level, logging.WARNING))
