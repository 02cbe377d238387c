"""The pieces of a `JobContext` shared by the slot runtime and the test harness.

`BaseJobContext` implements everything but where progress goes and where the
cancel flag lives: progress normalisation (fraction or done/total, with rate and
ETA derived), the work directory (made on first use), the output directory, and
input resolution (through `worker.fetch.fetch_input` when it is available, else
local paths and `file://` URIs only).
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote, urlparse

from worker._outcome import Progress
from worker.sdk import JobContext, PermanentError

#: output names become file names: keep them to one safe path component
_OUTPUT_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")

#: an input fetcher: (uri, dest_dir, is_cancelled) -> local path
InputFetcher = Callable[[str, Path, Callable[[], bool]], Path]


def resolve_local_input(uri: str, allowed_file_root: Path | str | None = None) -> Path:
    """Resolve a local path or a `file://` URI to an existing file.

    With `allowed_file_root`, the resolved path must lie under it (symlinks
    resolved first, so `..` and links cannot escape). Other schemes raise a
    `PermanentError` with code INVALID_INPUT.
    """
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise PermanentError(
                f"file URI with a host is not supported: {uri}", code="INVALID_INPUT"
            )
        path = Path(unquote(parsed.path))
    elif parsed.scheme == "" or (len(parsed.scheme) == 1 and uri[1:3] in (":\\", ":/")):
        path = Path(uri)
    else:
        raise PermanentError(
            f"cannot fetch {parsed.scheme}: inputs here (only local paths and file:// URIs): {uri}",
            code="INVALID_INPUT",
        )
    path = path.expanduser().resolve()
    if allowed_file_root is not None:
        root = Path(allowed_file_root).expanduser().resolve()
        if not path.is_relative_to(root):
            raise PermanentError(
                f"input {uri} is outside the allowed file root", code="INVALID_INPUT"
            )
    if not path.is_file():
        raise PermanentError(f"input not found: {uri}", code="INPUT_NOT_FOUND")
    return path


def build_progress(
    fraction: float | None,
    done: int | None,
    total: int | None,
    unit: str,
    stage: str,
    message: str,
    *,
    started_at: float,
    now: float,
) -> Progress:
    """Normalise one `ctx.progress(...)` call into a `Progress` dict.

    Keys: fraction, done, total, unit, stage, message, rate (units/s, from
    `done` since the job started), eta_s (seconds, when derivable), time
    (unix seconds).
    """
    if fraction is None and done is not None and total:
        fraction = done / total
    frac = min(max(float(fraction), 0.0), 1.0) if fraction is not None else 0.0
    elapsed = max(now - started_at, 1e-6)
    rate = 0.0
    eta_s: float | None = None
    if done is not None and done > 0:
        rate = done / elapsed
        if total and total >= done:
            eta_s = (total - done) / rate
    elif 0.0 < frac < 1.0:
        eta_s = elapsed * (1.0 - frac) / frac
    elif frac >= 1.0:
        eta_s = 0.0
    return {
        "fraction": frac,
        "done": int(done or 0),
        "total": int(total or 0),
        "unit": unit or "",
        "stage": stage or "",
        "message": message or "",
        "rate": rate,
        "eta_s": eta_s,
        "time": time.time(),
    }


class BaseJobContext(JobContext):
    """A `JobContext` missing only `_emit_progress` and `cancelled`.

    The work directory is either given (`workdir`: it exists and belongs to the
    caller) or made on first access of `ctx.workdir` under `workdir_root`, and
    then removed by `remove_workdir()`. Most small jobs never touch it, and a
    mkdtemp + rmtree per job was a quarter of a no-op worker's time.
    """

    def __init__(
        self,
        *,
        job_id: str,
        attempt: int,
        job_type: str,
        device: str,
        inputs: list[str],
        workdir: Path | None = None,
        workdir_root: Path | str | None = None,
        logger: logging.Logger | None = None,
        fetcher: InputFetcher | None = None,
        allowed_file_root: Path | str | None = None,
    ) -> None:
        self.job_id = job_id
        self.attempt = attempt
        self.job_type = job_type
        self.device = device
        self.inputs = list(inputs)
        if workdir is None and workdir_root is None:
            raise ValueError("a job context needs a workdir or a workdir_root")
        self._workdir = Path(workdir) if workdir is not None else None
        self._workdir_root = workdir_root  # a Path only when needed: most jobs never ask
        #: True once this context made its own directory (and so must remove it)
        self._workdir_made = False
        self._workdir_lock = threading.Lock()
        self.logger = logger or logging.getLogger(f"spool.job.{job_type}")
        self._fetcher = fetcher
        self._allowed_file_root = allowed_file_root
        self._started_at = time.monotonic()
        self._inputs_cache: dict[int, Path] = {}
        self._outputs: dict[str, Path] = {}
        self._lock = threading.Lock()

    # -- work directory -----------------------------------------------------
    @property
    def workdir(self) -> Path:  # type: ignore[override]  # a property, not a plain attribute
        """The attempt's private scratch directory, made on first access."""
        with self._workdir_lock:
            if self._workdir is None:
                assert self._workdir_root is not None
                root = Path(self._workdir_root)
                root.mkdir(parents=True, exist_ok=True)
                prefix = f"job-{self.job_id[:8]}-"
                self._workdir = Path(tempfile.mkdtemp(prefix=prefix, dir=root))
                self._workdir_made = True
            return self._workdir

    @property
    def workdir_created(self) -> bool:
        """True if `workdir` was made by this context (it is removed after the attempt)."""
        return self._workdir_made

    def remove_workdir(self) -> None:
        """Remove the work directory if this context made it (a given one is kept)."""
        with self._workdir_lock:
            if self._workdir_made and self._workdir is not None:
                shutil.rmtree(self._workdir, ignore_errors=True)

    # -- progress -----------------------------------------------------------
    def progress(
        self,
        fraction: float | None = None,
        *,
        done: int | None = None,
        total: int | None = None,
        unit: str = "",
        stage: str = "",
        message: str = "",
    ) -> None:
        """Report progress; see `JobContext.progress`."""
        self._emit_progress(
            build_progress(
                fraction,
                done,
                total,
                unit,
                stage,
                message,
                started_at=self._started_at,
                now=time.monotonic(),
            )
        )

    def _emit_progress(self, progress: Progress) -> None:
        raise NotImplementedError

    # -- inputs and outputs -------------------------------------------------
    def input_path(self, index: int = 0) -> Path:
        """Fetch input `index` once and return its local path."""
        if not 0 <= index < len(self.inputs):
            raise PermanentError(
                f"input {index} requested but the job has {len(self.inputs)} input(s)",
                code="INVALID_INPUT",
            )
        with self._lock:
            cached = self._inputs_cache.get(index)
        if cached is not None:
            return cached
        uri = self.inputs[index]
        if self._fetcher is not None:
            dest = self.workdir / "inputs" / str(index)
            dest.mkdir(parents=True, exist_ok=True)
            path = self._fetcher(uri, dest, lambda: self.cancelled)
        else:
            path = resolve_local_input(uri, self._allowed_file_root)
        with self._lock:
            self._inputs_cache[index] = path
        return path

    def output_path(self, name: str) -> Path:
        """Return `workdir/outputs/<name>`; the file is uploaded after a successful run."""
        if not _OUTPUT_NAME_RE.match(name) or name in (".", ".."):
            raise ValueError(f"output name must be a plain file name, got {name!r}")
        out_dir = self.workdir / "outputs"
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / name
        with self._lock:
            self._outputs[name] = path
        return path

    def outputs(self) -> dict[str, Path]:
        """Outputs requested through `output_path` whose files exist, in request order."""
        with self._lock:
            return {name: p for name, p in self._outputs.items() if p.exists()}
