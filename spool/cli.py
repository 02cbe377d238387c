"""`spool`: submit, watch and manage jobs from the shell.

    spool submit debug.sleep --param duration=5 --watch
    spool list --state running
    spool watch 3f2c…            # live progress bar; exit 0 only on SUCCEEDED
    spool download 3f2c… --output out/

Every command takes `--json` (machine-readable output on stdout) and the
connection options `--server` / `--token` / `--tls` / `--tls-ca` (or
SPOOL_SERVER, SPOOL_TOKEN, SPOOL_TLS, SPOOL_TLS_CA). Errors are one line on
stderr: exit 1 for a failed call or an unsuccessful job, 2 for bad arguments.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
import typer.core
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn
from rich.table import Table
from typer.exceptions import Abort, TyperException

from spool.client import (
    DEFAULT_SERVER,
    TERMINAL_STATES,
    Client,
    SpoolError,
    parse_state,
    state_name,
    to_dict,
)
from spool.v1 import job_pb2

#: the CLI gives up on an unreachable control plane sooner than a long-lived program
CLI_RETRY_BUDGET_S = 10.0
#: exit codes: a failed call or an unsuccessful job; bad arguments (click's convention)
EXIT_FAILURE = 1
EXIT_USAGE = 2


class _SpoolGroup(typer.core.TyperGroup):
    """Turns every error into one line on stderr with the right exit code (no traceback)."""

    def main(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        kwargs["standalone_mode"] = False
        try:
            code = super().main(*args, **kwargs)
        except TyperException as exc:
            # Usage errors carry exit code 2, other command-line errors 1. With no
            # arguments at all the help was already printed: nothing to add.
            if type(exc).__name__ == "NoArgsIsHelpError":
                sys.exit(exc.exit_code)
            _fail(exc.format_message(), exc.exit_code)
        except Abort:
            _fail("aborted", 130)
        except SpoolError as exc:
            _fail(_describe(exc), EXIT_FAILURE)
        except OSError as exc:
            _fail(str(exc), EXIT_FAILURE)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=_SpoolGroup,
    name="spool",
    help="Submit, watch and manage Spool jobs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

#: table width when stdout is not a terminal (pipes, files): wide enough for a UUID
#: and a type name without truncation
PIPE_WIDTH = 160


class _Consoles:
    """Rich consoles made on first use, so they write to the current sys.stdout/stderr."""

    def _make(self, stderr: bool) -> Console:
        stream = sys.stderr if stderr else sys.stdout
        width = None if stream.isatty() else PIPE_WIDTH
        return Console(stderr=stderr, highlight=False, soft_wrap=True, width=width)

    def print(self, *objects: Any, stderr: bool = False) -> None:
        self._make(stderr).print(*objects)

    def console(self, stderr: bool = False) -> Console:
        return self._make(stderr)


_consoles = _Consoles()


class _Out:
    def __init__(self, stderr: bool) -> None:
        self.stderr = stderr

    def print(self, *objects: Any) -> None:
        _consoles.print(*objects, stderr=self.stderr)


out = _Out(stderr=False)
err = _Out(stderr=True)


def _fail(message: str, code: int) -> NoReturn:
    # One line: newlines inside a message (click's hints) are folded.
    line = " ".join(message.split())
    print(f"error: {line}", file=sys.stderr)
    sys.exit(code)


def _describe(exc: SpoolError) -> str:
    return f"{exc.code.name}: {exc}"


# -- shared options ------------------------------------------------------------

ServerOpt = Annotated[
    str, typer.Option("--server", envvar="SPOOL_SERVER", help="control plane host:port")
]
TokenOpt = Annotated[
    str, typer.Option("--token", envvar="SPOOL_TOKEN", help="API key", show_default=False)
]
TlsOpt = Annotated[bool, typer.Option("--tls", envvar="SPOOL_TLS", help="use TLS")]
TlsCaOpt = Annotated[
    str, typer.Option("--tls-ca", envvar="SPOOL_TLS_CA", help="CA bundle (PEM) for --tls")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="machine-readable output on stdout")]
JobIdArg = Annotated[str, typer.Argument(help="job id", show_default=False)]


@dataclass
class _Conn:
    server: str
    token: str
    tls: bool
    tls_ca: str

    def client(self) -> Client:
        return Client(
            self.server,
            token=self.token,
            tls=self.tls,
            tls_ca=self.tls_ca,
            retry_budget=CLI_RETRY_BUDGET_S,
        )


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=False))


def _parse_value(text: str) -> Any:
    """`5` → 5, `true` → True, `[1,2]` → list, `"x"` → "x"; anything else stays a string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _parse_pairs(items: list[str], option: str, *, json_values: bool) -> dict[str, Any]:
    pairs: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"{item!r} is not key=value", param_hint=option)
        pairs[key.strip()] = _parse_value(value) if json_values else value
    return pairs


def _load_params_file(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        text = sys.stdin.read() if str(path) == "-" else path.read_text()
        params = json.loads(text)
    except OSError as exc:
        raise typer.BadParameter(
            f"cannot read {path}: {exc.strerror}", param_hint="--params-json"
        ) from None
    except ValueError as exc:
        raise typer.BadParameter(f"{path} is not JSON: {exc}", param_hint="--params-json") from None
    if not isinstance(params, dict):
        raise typer.BadParameter(f"{path} must hold a JSON object", param_hint="--params-json")
    return params


# -- human-readable rendering ----------------------------------------------------


def _ts(message: Any) -> str:
    return message.ToDatetime().strftime("%Y-%m-%d %H:%M:%S") if message.seconds else "-"


def _plain(value: Any) -> Any:
    """Struct numbers are doubles: show 30.0 as 30 for people."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _progress_text(p: job_pb2.Progress) -> str:
    if not (p.fraction or p.total or p.stage):
        return "-"
    text = f"{p.fraction:.0%}"
    if p.total:
        text += f" {p.done}/{p.total} {p.unit}".rstrip()
    if p.stage:
        text += f" {p.stage}"
    return text


def _error_text(e: job_pb2.JobError) -> str:
    return f"{e.code}: {e.message}" if e.code else e.message


def _job_rows(job: job_pb2.Job) -> Iterator[tuple[str, str]]:
    yield "id", job.id
    yield "type", job.type
    yield "state", state_name(job.state) + (" (cancel requested)" if job.cancel_requested else "")
    yield (
        "attempt",
        f"{job.attempt} of {job.max_attempts}" if job.max_attempts else str(job.attempt),
    )
    yield "priority", str(job.priority)
    yield "progress", _progress_text(job.progress)
    if job.HasField("error") and (job.error.code or job.error.message):
        yield "error", _error_text(job.error)
    if job.HasField("result"):
        yield "result", json.dumps(_plain(to_dict(job.result)))
    if job.params.fields:
        yield "params", json.dumps(_plain(to_dict(job.params)))
    for name in ("inputs", "outputs"):
        if getattr(job, name):
            yield name, "\n".join(getattr(job, name))
    if job.labels:
        yield "labels", ",".join(f"{k}={v}" for k, v in sorted(job.labels.items()))
    if job.concurrency_key:
        yield "concurrency key", job.concurrency_key
    if job.worker_id:
        yield "worker", job.worker_id
    yield "created", _ts(job.create_time)
    if job.start_time.seconds:
        yield "started", _ts(job.start_time)
    if job.finish_time.seconds:
        yield "finished", _ts(job.finish_time)


def _print_job(job: job_pb2.Job) -> None:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    for key, value in _job_rows(job):
        table.add_row(key, value)
    out.print(table)


def _fmt_rate(p: job_pb2.Progress) -> str:
    return f"{p.rate:.1f} {p.unit or 'units'}/s" if p.rate else ""


def _fmt_eta(p: job_pb2.Progress) -> str:
    if not p.HasField("eta"):
        return ""
    seconds = int(p.eta.ToTimedelta().total_seconds())
    return f"ETA {seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _watch(client: Client, job_id: str, mode: str) -> job_pb2.Job:
    """Follow a job to its end and return the final job.

    mode: "bar" (a live progress bar on stderr), "events" (one JSON event per
    line on stdout) or "quiet".
    """
    if mode != "bar":
        for event in client.watch(job_id):
            if mode == "events":
                print(json.dumps(to_dict(event)), flush=True)
        return client.get(job_id)
    columns = (
        TextColumn("{task.fields[state]:<9}"),
        TextColumn("{task.fields[stage]}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[units]}"),
        TextColumn("{task.fields[rate]}"),
        TextColumn("{task.fields[eta]}"),
    )
    job = client.get(job_id)
    with Progress(*columns, console=_consoles.console(stderr=True), transient=False) as bar:
        task = bar.add_task(
            job_id, total=1.0, state=state_name(job.state), stage="", units="", rate="", eta=""
        )
        for event in client.watch(job_id):
            fields: dict[str, Any] = {}
            if event.kind == job_pb2.JOB_EVENT_KIND_STATE:
                fields["state"] = state_name(event.state)
                if event.state == job_pb2.JOB_STATE_SUCCEEDED:
                    fields["completed"] = 1.0
            elif event.kind == job_pb2.JOB_EVENT_KIND_PROGRESS:
                p = event.progress
                fields.update(
                    completed=p.fraction,
                    stage=p.stage,
                    units=f"{p.done}/{p.total} {p.unit}".rstrip() if p.total else "",
                    rate=_fmt_rate(p),
                    eta=_fmt_eta(p),
                )
            elif event.kind == job_pb2.JOB_EVENT_KIND_CANCEL_REQUESTED:
                fields["state"] = "canceling"
            bar.update(task, **fields)
    return client.get(job_id)


def _finish(job: job_pb2.Job, mode: str, extra: dict[str, Any] | None = None) -> None:
    """Report a finished job (mode "text", "json" or "quiet"); exit 1 unless it SUCCEEDED."""
    if mode == "json":
        _print_json({**to_dict(job), **(extra or {})})
    elif mode == "text" and job.state == job_pb2.JOB_STATE_SUCCEEDED:
        out.print(f"job {job.id} succeeded")
    if job.state != job_pb2.JOB_STATE_SUCCEEDED:
        reason = f": {_error_text(job.error)}" if job.error.code or job.error.message else ""
        _fail(f"job {job.id} {state_name(job.state)}{reason}", EXIT_FAILURE)


# -- commands ----------------------------------------------------------------------


@app.command()
def submit(
    type: Annotated[str, typer.Argument(help="job type, e.g. debug.sleep", show_default=False)],
    param: Annotated[
        list[str] | None,
        typer.Option("--param", "-p", help="k=v; v is read as JSON when it parses (5, true)"),
    ] = None,
    params_json: Annotated[
        Path | None, typer.Option("--params-json", help="JSON object of params ('-': stdin)")
    ] = None,
    input: Annotated[
        list[str] | None,
        typer.Option("--input", "-i", help="local file (uploaded) or URI; repeatable"),
    ] = None,
    priority: Annotated[int, typer.Option(help="-100..100, higher runs first")] = 0,
    key: Annotated[str, typer.Option("--key", help="concurrency key")] = "",
    label: Annotated[list[str] | None, typer.Option("--label", "-l", help="k=v")] = None,
    max_attempts: Annotated[int, typer.Option(help="0: the type's default")] = 0,
    timeout: Annotated[float, typer.Option(help="per-attempt time limit, seconds")] = 0.0,
    request_id: Annotated[str, typer.Option(help="idempotency key (default: random)")] = "",
    watch: Annotated[bool, typer.Option("--watch", "-w", help="follow it to the end")] = False,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="download outputs here (implies --watch)")
    ] = None,
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = "",
    tls: TlsOpt = False,
    tls_ca: TlsCaOpt = "",
    json_out: JsonOpt = False,
) -> None:
    """Submit a job; prints its id (with --watch, follows it and exits 0 only on success)."""
    if not -100 <= priority <= 100:
        raise typer.BadParameter("must be between -100 and 100", param_hint="--priority")
    params = _load_params_file(params_json)
    params.update(_parse_pairs(param or [], "--param", json_values=True))
    labels = _parse_pairs(label or [], "--label", json_values=False)
    for item in input or []:
        if "://" not in item and not item.startswith("blob:") and not Path(item).is_file():
            raise typer.BadParameter(f"{item}: no such file", param_hint="--input")
    with _Conn(server, token, tls, tls_ca).client() as client:
        job = client.submit(
            type,
            params,
            inputs=list(input or []),
            priority=priority,
            labels=labels,
            concurrency_key=key or None,
            max_attempts=max_attempts,
            timeout=timeout or None,
            request_id=request_id or None,
        )
        if not (watch or output):
            if json_out:
                _print_json(to_dict(job))
            else:
                out.print(job.id)
            return
        if not json_out:
            err.print(f"submitted {job.id}")
        final = _watch(client, job.id, "quiet" if json_out else "bar")
        extra: dict[str, Any] = {}
        if output is not None and final.state == job_pb2.JOB_STATE_SUCCEEDED:
            paths = client.download(final.id, output)
            extra["downloaded"] = [str(p) for p in paths]
            if not json_out:
                for path in paths:
                    out.print(f"downloaded {path}")
        _finish(final, "json" if json_out else "text", extra)


@app.command("watch")
def watch_cmd(
    job_id: JobIdArg,
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = "",
    tls: TlsOpt = False,
    tls_ca: TlsCaOpt = "",
    json_out: JsonOpt = False,
) -> None:
    """Follow a job with a live progress bar (--json: one event per line); exit 0 on success."""
    with _Conn(server, token, tls, tls_ca).client() as client:
        final = _watch(client, job_id, "events" if json_out else "bar")
    _finish(final, "quiet" if json_out else "text")


@app.command()
def get(
    job_id: JobIdArg,
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = "",
    tls: TlsOpt = False,
    tls_ca: TlsCaOpt = "",
    json_out: JsonOpt = False,
) -> None:
    """Show one job."""
    with _Conn(server, token, tls, tls_ca).client() as client:
        job = client.get(job_id)
    if json_out:
        _print_json(to_dict(job))
    else:
        _print_job(job)


@app.command("list")
def list_cmd(
    state: Annotated[
        list[str] | None, typer.Option("--state", "-s", help="queued, running, succeeded…")
    ] = None,
    type: Annotated[str, typer.Option("--type", "-t", help="only this job type")] = "",
    label: Annotated[list[str] | None, typer.Option("--label", "-l", help="k=v")] = None,
    limit: Annotated[int, typer.Option(min=1, help="at most this many jobs")] = 20,
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = "",
    tls: TlsOpt = False,
    tls_ca: TlsCaOpt = "",
    json_out: JsonOpt = False,
) -> None:
    """List jobs, newest first."""
    try:
        states = [parse_state(s) for s in state or []]
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--state") from None
    labels = _parse_pairs(label or [], "--label", json_values=False)
    with _Conn(server, token, tls, tls_ca).client() as client:
        jobs = list(client.list(states, type, labels, limit=limit))
    if json_out:
        _print_json([to_dict(j) for j in jobs])
        return
    table = Table(box=None, header_style="bold")
    for column in ("ID", "TYPE", "STATE", "PROGRESS", "PRI", "ATTEMPT", "CREATED"):
        table.add_column(column, no_wrap=True)
    for j in jobs:
        table.add_row(
            j.id,
            j.type,
            state_name(j.state),
            _progress_text(j.progress) if j.state not in TERMINAL_STATES else "-",
            str(j.priority),
            str(j.attempt),
            _ts(j.create_time),
        )
    out.print(table)


def _change(action: str, job_id: str, conn: _Conn, json_out: bool, **kw: Any) -> None:
    with conn.client() as client:
        job = getattr(client, action)(job_id, **kw)
    if json_out:
        _print_json(to_dict(job))
    else:
        out.print(f"{job.id} {state_name(job.state)}")


@app.command()
def cancel(
    job_id: JobIdArg,
    reason: Annotated[str, typer.Option(help="recorded with the cancel")] = "",
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = "",
    tls: TlsOpt = False,
    tls_ca: TlsCaOpt = "",
    json_out: JsonOpt = False,
) -> None:
    """Cancel a job (a running one is asked to stop)."""
    _change("cancel", job_id, _Conn(server, token, tls, tls_ca), json_out, reason=reason)


@app.command()
def retry(
    job_id: JobIdArg,
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = "",
    tls: TlsOpt = False,
    tls_ca: TlsCaOpt = "",
    json_out: JsonOpt = False,
) -> None:
    """Requeue a failed or canceled job."""
    _change("retry", job_id, _Conn(server, token, tls, tls_ca), json_out)


@app.command()
def delete(
    job_id: JobIdArg,
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = "",
    tls: TlsOpt = False,
    tls_ca: TlsCaOpt = "",
    json_out: JsonOpt = False,
) -> None:
    """Delete a finished job and its history."""
    with _Conn(server, token, tls, tls_ca).client() as client:
        client.delete(job_id)
    if json_out:
        _print_json({"id": job_id, "deleted": True})
    else:
        out.print(f"{job_id} deleted")


_COUNT_NAMES = ("queued", "running", "succeeded", "failed", "canceled")


@app.command()
def stats(
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = "",
    tls: TlsOpt = False,
    tls_ca: TlsCaOpt = "",
    json_out: JsonOpt = False,
) -> None:
    """Job counts by state and type, queue depth, connected workers."""
    with _Conn(server, token, tls, tls_ca).client() as client:
        s = client.stats()
    if json_out:
        _print_json(to_dict(s))
        return
    table = Table(box=None, header_style="bold")
    table.add_column("TYPE")
    for name in _COUNT_NAMES:
        table.add_column(name.upper(), justify="right")
    for name, counts in [("(all)", s.totals), *sorted(s.by_type.items())]:
        table.add_row(name, *(str(getattr(counts, n)) for n in _COUNT_NAMES))
    out.print(table)
    age = s.oldest_queued_age.ToTimedelta().total_seconds()
    out.print(
        f"queue depth {s.queue_depth}, oldest queued {age:.1f}s, "
        f"workers connected {s.connected_workers}"
    )


@app.command()
def workers(
    all: Annotated[bool, typer.Option("--all", "-a", help="include disconnected ones")] = False,
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = "",
    tls: TlsOpt = False,
    tls_ca: TlsCaOpt = "",
    json_out: JsonOpt = False,
) -> None:
    """Workers: device, slots, running jobs, last heartbeat, the replica they talk to."""
    with _Conn(server, token, tls, tls_ca).client() as client:
        found = client.workers(include_disconnected=all)
    if json_out:
        _print_json([to_dict(w) for w in found])
        return
    table = Table(box=None, header_style="bold")
    for column in ("ID", "NAME", "DEVICE", "SLOTS", "RUNNING", "LABELS", "HEARTBEAT", "REPLICA"):
        table.add_column(column, no_wrap=True)
    for w in found:
        device = w.device.kind + (f":{w.device.index}" if w.device.kind == "cuda" else "")
        if w.device.name and w.device.name != w.device.kind:
            device += f" ({w.device.name})"
        table.add_row(
            w.id,
            w.name,
            device,
            str(w.slots),
            str(len(w.running_job_ids)),
            ",".join(f"{k}={v}" for k, v in sorted(w.labels.items())) or "-",
            _ts(w.last_heartbeat_time),
            (w.control_replica or "-") if w.connected else "disconnected",
        )
    out.print(table)


@app.command()
def download(
    job_id: JobIdArg,
    output: Annotated[Path, typer.Option("--output", "-o", help="directory")] = Path("."),
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = "",
    tls: TlsOpt = False,
    tls_ca: TlsCaOpt = "",
    json_out: JsonOpt = False,
) -> None:
    """Download a job's outputs."""
    with _Conn(server, token, tls, tls_ca).client() as client:
        paths = client.download(job_id, output)
    if json_out:
        _print_json([str(p) for p in paths])
    else:
        for path in paths:
            out.print(str(path))
        if not paths:
            err.print(f"job {job_id} has no outputs to download")


def main() -> None:
    """Entry point of the `spool` console script."""
    app(prog_name="spool")


if __name__ == "__main__":
    main()
