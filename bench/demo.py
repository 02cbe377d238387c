"""`make demo`: remove a known overlay from a generated clip, through the `spool` CLI.

    python -m bench.demo                   # use SPOOL_SERVER if it answers, else a private one
    python -m bench.demo --local           # always start a private control plane + worker
    python -m bench.demo --mode template   # give the logo PNG as a second input

1. Generates a 640x360 clip (6 s, 24 fps) of moving synthetic content with a
   semi-transparent logo blended in (worker/media/synth.py), keeping the clean
   frames as ground truth.
2. Finds a control plane: the one at SPOOL_SERVER (default 127.0.0.1:50051) if
   its gRPC health check answers and a connected worker serves
   `video.remove_overlay`; otherwise starts one on a free port (embedded
   Postgres in a temp dir, auth off) plus one `python -m worker.main`, and
   stops both at the end.
3. Runs the real CLI, printing each command: `spool workers`, then
   `spool submit video.remove_overlay … --watch --output DIR` (the live
   progress bar), then `spool list`.
4. Scores the input and the downloaded result against the clean frames on the
   logo's pixels (worker/media/quality.py) and prints PSNR before → after.

Files land in bench/out/demo/ (or --output): the input clip, the logo
template, the ground truth, the result, its report.json, a side-by-side
compare.png and summary.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np

from worker.media import quality, synth

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO / "bench" / "out" / "demo"
JOB_TYPE = "video.remove_overlay"
WIDTH, HEIGHT, FPS = 640, 360, 24
LOGO_H = 36
#: pixels of context kept around the logo when scoring (>= SSIM's 7x7 window)
MARGIN = 8
HEALTH_TIMEOUT_S = 1.0
WORKER_READY_TIMEOUT_S = 90.0
JOB_TIMEOUT_S = 300.0

#: the user's connection settings, which do not apply to a private control plane
_CONNECTION_ENV = frozenset(
    ("SPOOL_SERVER", "SPOOL_TOKEN", "SPOOL_TLS", "SPOOL_TLS_CA", "SPOOL_TLS_CERT", "SPOOL_TLS_KEY")
)


# ------------------------------------------------------------------------ the clip


@dataclass
class Clip:
    """A generated clip and what we know about it."""

    video: Path
    template: Path
    truth: Path
    frames: int
    #: (y, x, h, w) of the logo, and of the scored crop around it
    logo_box: tuple[int, int, int, int]
    crop_box: tuple[int, int, int, int]
    #: the clean frames cropped to `crop_box`: the ground truth that is scored
    clean_crops: list[np.ndarray]
    #: the logo's alpha within `crop_box` (zero outside the logo)
    alpha_crop: np.ndarray
    logo: synth.Logo


def _crop(frame: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    y, x, h, w = box
    return frame[y : y + h, x : x + w]


def make_clip(out: Path, seconds: float) -> Clip:
    """Write the overlaid clip, the logo PNG and the clean clip; keep clean crops in memory."""
    n = max(2, round(seconds * FPS))
    logo = synth.make_logo(LOGO_H, LOGO_H * 3)
    lh, lw = logo.size
    y, x = HEIGHT - lh - 18, WIDTH - lw - 24  # bottom right, like a broadcaster's bug
    crop_box = (y - MARGIN, x - MARGIN, lh + 2 * MARGIN, lw + 2 * MARGIN)
    alpha = synth.alpha_mask(HEIGHT, WIDTH, logo, (y, x), quality.OPACITY)
    clean = list(synth.clean_frames(n, HEIGHT, WIDTH))
    synth.write_video(
        out / "clip.mp4", (synth.blend(f, logo, (y, x), quality.OPACITY) for f in clean)
    )
    synth.write_video(out / "truth.mp4", clean)
    return Clip(
        video=out / "clip.mp4",
        template=logo.save_png(out / "logo.png"),
        truth=out / "truth.mp4",
        frames=n,
        logo_box=(y, x, lh, lw),
        crop_box=crop_box,
        clean_crops=[_crop(f, crop_box).copy() for f in clean],
        alpha_crop=_crop(alpha, crop_box).copy(),
        logo=logo,
    )


def decode_crops(path: Path, box: tuple[int, int, int, int]) -> list[np.ndarray]:
    """Decode a video and keep only `box` of every frame (RGB)."""
    with av.open(str(path)) as c:
        return [_crop(f.to_ndarray(format="rgb24"), box).copy() for f in c.decode(video=0)]


def score(path: Path, clip: Clip) -> dict[str, float]:
    """PSNR, SSIM and flicker of a video against the clean clip, on the logo's pixels."""
    crops = decode_crops(path, clip.crop_box)
    if len(crops) != clip.frames:
        raise RuntimeError(f"{path}: {len(crops)} frames, expected {clip.frames}")
    case = quality.Case(
        name="demo",
        clean=clip.clean_crops,
        blended=[],
        alphas=[clip.alpha_crop] * clip.frames,
        logo=clip.logo,
        positions=[],
    )
    return {k: float(v) for k, v in quality.score(crops, case).items()}


def write_compare(clip: Clip, result: Path, out: Path) -> Path:
    """input | result | ground truth of the middle frame's logo region, enlarged 3x."""
    mid = clip.frames // 2
    rows = []
    for path in (clip.video, result, clip.truth):
        with av.open(str(path)) as c:
            for i, frame in enumerate(c.decode(video=0)):
                if i == mid:
                    rows.append(_crop(frame.to_ndarray(format="rgb24"), clip.crop_box))
                    break
    gap = np.full((rows[0].shape[0], 4, 3), 255, np.uint8)
    strip = np.hstack([rows[0], gap, rows[1], gap, rows[2]])
    strip = cv2.resize(strip, None, fx=3, fy=3, interpolation=cv2.INTER_NEAREST)
    cv2.imwrite(str(out), cv2.cvtColor(strip, cv2.COLOR_RGB2BGR))
    return out


# -------------------------------------------------------------- the control plane


def server_answers(server: str) -> bool:
    """True if a gRPC health check at `server` says SERVING within a second."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from spool.client._options import ClientOptions, open_channel

    async def check() -> bool:
        channel = open_channel(ClientOptions(server=server).resolved())
        try:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=HEALTH_TIMEOUT_S)
            return reply.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.aio.AioRpcError:
            return False
        finally:
            await channel.close()

    return asyncio.run(check())


def _private_env() -> dict[str, str]:
    """The environment without the user's connection settings (TLS, key, server)."""
    return {k: v for k, v in os.environ.items() if k not in _CONNECTION_ENV}


async def _worker_serving(server: str, *, private: bool = False) -> tuple[bool, str]:
    """Whether a connected worker at `server` serves JOB_TYPE (and why not)."""
    from spool.client import AsyncClient
    from spool.client.errors import SpoolError

    tls = False if private else None  # None: SPOOL_TLS decides
    async with AsyncClient(server, tls=tls, retry_budget=2.0, timeout=5.0) as client:
        try:
            workers = await client.workers()
        except SpoolError as exc:
            hint = (
                " (set SPOOL_TOKEN to a client key)" if exc.code.name == "UNAUTHENTICATED" else ""
            )
            return False, f"{exc.code.name}: {exc.message}{hint}"
    if any(JOB_TYPE in w.job_types for w in workers if w.connected):
        return True, ""
    return False, f"no connected worker serves {JOB_TYPE}"


def _spawn_worker(server: str, tmp: Path, log_path: Path) -> subprocess.Popen[bytes]:
    env = {
        **_private_env(),
        "SPOOL_SERVER": server,
        "SPOOL_WORKER_METRICS_PORT": "0",  # `make run`'s worker may hold the usual port
        "SPOOL_WORKER_ID": f"demo-{os.getpid()}",
        "SPOOL_WORKER_NAME": "demo",
        "SPOOL_WORKER_TYPES": JOB_TYPE,
        "SPOOL_WORKER_STATE_DIR": str(tmp / "worker-state"),
        "SPOOL_WORKER_WORKDIR": str(tmp / "worker-work"),
        "SPOOL_LOG_LEVEL": "WARNING",
    }
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "worker.main"],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


async def _wait_worker(server: str, proc: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + WORKER_READY_TIMEOUT_S
    while not (await _worker_serving(server, private=True))[0]:
        if proc.poll() is not None:
            tail = (await asyncio.to_thread(log_path.read_text, errors="replace"))[-3000:]
            raise RuntimeError(f"the worker exited (code {proc.returncode}):\n{tail}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the worker did not connect in {WORKER_READY_TIMEOUT_S:.0f}s")
        await asyncio.sleep(0.2)


@contextlib.asynccontextmanager
async def local_plane(out: Path, database_url: str = "") -> AsyncIterator[str]:
    """A control plane on a free port (auth off) and one worker; yields its address."""
    from control.config import Settings
    from control.devrun import stop_worker
    from control.server import start_server

    with tempfile.TemporaryDirectory(prefix="spool-demo-") as tmpdir:
        tmp = Path(tmpdir)
        settings = Settings(
            listen="127.0.0.1:0",
            data_dir=str(tmp / "data"),
            database_url=database_url,
            auth=False,
            log_level="WARNING",
            shutdown_grace_s=1.0,
        )
        cp = await start_server(settings)
        log_path = out / "worker.log"
        worker = _spawn_worker(cp.address, tmp, log_path)
        try:
            await _wait_worker(cp.address, worker, log_path)
            yield cp.address
        finally:
            await stop_worker(worker)
            await cp.stop(settings.shutdown_grace_s)


# ------------------------------------------------------------------------ the CLI


def _spool_command() -> list[str]:
    exe = Path(sys.executable).with_name("spool")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "spool.cli"]


def _shown(path: Path) -> str:
    """A path as the user would type it: relative to the current directory when inside it."""
    with contextlib.suppress(ValueError):
        return str(path.resolve().relative_to(Path.cwd()))
    return str(path)


@dataclass
class Target:
    """Where the CLI goes: --server (None: SPOOL_SERVER) and its environment (None: ours)."""

    server: str | None = None
    env: dict[str, str] | None = None


async def run_cli(args: list[str], target: Target) -> int:
    """Print `$ spool …` and run it, its output going straight to this terminal."""
    full = [*args, *(["--server", target.server] if target.server else [])]
    print(f"\n$ spool {shlex.join(full)}", flush=True)
    proc = await asyncio.create_subprocess_exec(*_spool_command(), *full, env=target.env)
    try:
        return await asyncio.wait_for(proc.wait(), JOB_TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return 124


# ----------------------------------------------------------------------- the demo


@contextlib.asynccontextmanager
async def control_plane(args: argparse.Namespace, out: Path) -> AsyncIterator[Target]:
    """The user's control plane if it can run the demo, else a private one while in use."""
    from spool.client._options import ClientOptions

    if not args.local:
        server = ClientOptions(server=args.server).resolved().server
        if await asyncio.to_thread(server_answers, server):
            ok, why = await _worker_serving(server)
            if ok:
                print(f"using the control plane at {server}")
                yield Target(server=args.server or None)
                return
            print(f"the control plane at {server} answers, but {why}; starting a private one")
        else:
            print(f"no control plane answers at {server}; starting a private one")
    t0 = time.perf_counter()
    print("starting a control plane (embedded Postgres) and one worker…", flush=True)
    async with local_plane(out, args.database_url) as address:
        print(f"control plane at {address}, worker connected ({time.perf_counter() - t0:.1f} s)")
        yield Target(server=address, env=_private_env())


async def run_demo(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Generate, submit through the CLI, download, score; returns the summary."""
    result_dir = out / "result"
    t0 = time.perf_counter()
    clip = await asyncio.to_thread(make_clip, out, args.seconds)
    y, x, lh, lw = clip.logo_box
    print(
        f"generated {_shown(clip.video)}: {WIDTH}x{HEIGHT}, {clip.frames} frames at {FPS} fps,"
        f" a {lw}x{lh} logo at x={x} y={y}, opacity {quality.OPACITY}"
        f" ({time.perf_counter() - t0:.1f} s)",
        flush=True,
    )

    inputs = ["--input", _shown(clip.video)]
    if args.mode == "template":
        inputs += ["--input", _shown(clip.template)]
    submit = ["submit", JOB_TYPE, *inputs, "--param", f"mode={args.mode}"]
    submit += ["--watch", "--output", _shown(result_dir)]

    async with control_plane(args, out) as target:
        await run_cli(["workers"], target)
        t_job = time.perf_counter()
        code = await run_cli(submit, target)
        job_s = time.perf_counter() - t_job
        if code != 0:
            raise RuntimeError(f"spool submit exited with {code}")
        await run_cli(["list", "--type", JOB_TYPE, "--limit", "3"], target)
    summary = await asyncio.to_thread(summarise, clip, result_dir, job_s)
    summary["total_s"] = round(time.perf_counter() - t0, 2)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    _print_summary(summary)
    return summary


def summarise(clip: Clip, result_dir: Path, job_s: float) -> dict[str, Any]:
    """Score the input and the result against the clean frames; write compare.png."""
    result = result_dir / "clean.mp4"
    report = json.loads((result_dir / "report.json").read_text())
    before = score(clip.video, clip)
    after = score(result, clip)
    compare = write_compare(clip, result, clip.video.with_name("compare.png"))
    return {
        "mode": report["mode"],
        "frames": clip.frames,
        "input": str(clip.video),
        "template": str(clip.template),
        "ground_truth": str(clip.truth),
        "result": str(result),
        "report": str(result_dir / "report.json"),
        "compare": str(compare),
        "psnr_before_db": before["psnr"],
        "psnr_after_db": after["psnr"],
        "ssim_before": before["ssim"],
        "ssim_after": after["ssim"],
        "job_s": round(job_s, 2),
        "restore_fps": report.get("stages", {}).get("restore", {}).get("end_to_end_fps"),
        "handler_s": report["elapsed_s"],
    }


def _print_summary(s: dict[str, Any]) -> None:
    gain = s["psnr_after_db"] - s["psnr_before_db"]
    other = "auto" if s["mode"] == "template" else "template"
    rows = [
        ("input", f"{_shown(Path(s['input']))}  (logo template {_shown(Path(s['template']))})"),
        ("result", f"{_shown(Path(s['result']))}  + {_shown(Path(s['report']))}"),
        ("ground truth", _shown(Path(s["ground_truth"]))),
        ("side by side", f"{_shown(Path(s['compare']))}  (input | result | truth, 3x)"),
        (
            "PSNR on the logo",
            f"{s['psnr_before_db']:.1f} dB before → {s['psnr_after_db']:.1f} dB after"
            f" ({gain:+.1f} dB); SSIM {s['ssim_before']:.3f} → {s['ssim_after']:.3f}",
        ),
        (
            "speed",
            f"{s['frames']} frames: handler {s['handler_s']:.1f} s (restore pass"
            f" {s['restore_fps']} fps); submit → downloaded {s['job_s']:.1f} s",
        ),
        ("mode", f"{s['mode']}  (also try: python -m bench.demo --mode {other})"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\nSummary")
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    print(f"  {'total':<{width}}  {s['total_s']:.1f} s")


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the exit code (0: the result beat the input)."""
    ap = argparse.ArgumentParser(prog="python -m bench.demo", description=__doc__.split("\n")[0])
    ap.add_argument("--server", default="", help="control plane to use (default: SPOOL_SERVER)")
    ap.add_argument("--local", action="store_true", help="always start a private control plane")
    ap.add_argument("--mode", choices=("auto", "template"), default="auto")
    ap.add_argument("--seconds", type=float, default=6.0, help="length of the clip")
    ap.add_argument("--output", default=str(DEFAULT_OUTPUT), help="where the files go")
    ap.add_argument(
        "--database-url", default="", help="private control plane: this Postgres, not embedded"
    )
    args = ap.parse_args(argv)
    # The private control plane runs in this process, and stopping its embedded
    # Postgres forks (pg_ctl) while gRPC threads are busy, which makes gRPC print
    # a harmless "skipping fork() handlers" line; nothing here forks without exec.
    # (Read when gRPC initialises, i.e. later, unless it is already imported.)
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
    out = Path(args.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / "result", ignore_errors=True)  # the CLI would not overwrite it
    try:
        summary = asyncio.run(run_demo(args, out))
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0 if summary["psnr_after_db"] > summary["psnr_before_db"] else 1


if __name__ == "__main__":
    sys.exit(main())
