"""The transport's own fan-out ceiling, for bench.scale's fan-out figures.

A bare grpc.aio server (uvloop, raw bytes: no protobuf, no interceptors, no
database) streams each event to every open watcher, and the watchers are read
the way bench.scale reads Spool's (in the bench process, WATCHERS_PER_CHANNEL
streams a connection). Whatever delay and CPU per message this shows, no
server written on grpc.aio can go below on the same machine.

    python -m bench.fanout_ceiling --watchers 1000 --events 40 --interval 0.25
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Any

SERVICE = "bench.Fanout"
#: event payload: the send time, padded to about a progress event's size
PAYLOAD_BYTES = 120
REPO = Path(__file__).resolve().parent.parent


def _identity(b: bytes) -> bytes:
    return b


async def _serve() -> None:
    import grpc

    queues: list[asyncio.Queue[bytes | None]] = []

    async def watch(_request: bytes, context: Any) -> Any:
        q: asyncio.Queue[bytes | None] = asyncio.Queue()
        queues.append(q)
        await context.send_initial_metadata(())  # the watcher knows it is listed
        while (item := await q.get()) is not None:
            yield item

    async def fire(_request: bytes, _context: Any) -> bytes:
        stamp = repr(time.time()).encode().ljust(PAYLOAD_BYTES)
        for q in queues:
            q.put_nowait(stamp)
        return b""

    async def end(_request: bytes, _context: Any) -> bytes:
        for q in queues:
            q.put_nowait(None)
        return b""

    codec = {"request_deserializer": _identity, "response_serializer": _identity}
    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Watch": grpc.unary_stream_rpc_method_handler(watch, **codec),
            "Fire": grpc.unary_unary_rpc_method_handler(fire, **codec),
            "End": grpc.unary_unary_rpc_method_handler(end, **codec),
        },
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(watchers: int, events: int, interval_s: float, per_channel: int) -> dict:
    """Delay per (event, watcher) and CPU per message of the bare server and the clients."""
    import grpc

    from bench.bigtable import summary

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.fanout_ceiling", "--serve",
        stdout=asyncio.subprocess.PIPE, cwd=REPO,
    )  # fmt: skip
    channels: list[Any] = []
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        address = f"127.0.0.1:{int(line)}"
        channels = [grpc.aio.insecure_channel(address) for _ in range(-(-watchers // per_channel))]
        codec = {"request_serializer": _identity, "response_deserializer": _identity}
        delays: list[float] = []
        opened = 0
        all_open = asyncio.Event()

        async def watch(i: int) -> None:
            nonlocal opened
            call = channels[i // per_channel].unary_stream(f"/{SERVICE}/Watch", **codec)(b"")
            await call.wait_for_connection()
            opened += 1
            if opened == watchers:
                all_open.set()
            async for msg in call:
                delays.append((time.time() - float(msg)) * 1000)

        tasks = [asyncio.create_task(watch(i)) for i in range(watchers)]
        await asyncio.wait_for(all_open.wait(), 60)
        fire = channels[0].unary_unary(f"/{SERVICE}/Fire", **codec)
        server0, client0 = _cpu_s(proc.pid), time.process_time()
        for _ in range(events):
            await fire(b"")
            await asyncio.sleep(interval_s)
        server1, client1 = _cpu_s(proc.pid), time.process_time()
        await channels[0].unary_unary(f"/{SERVICE}/End", **codec)(b"")
        await asyncio.wait(tasks, timeout=30)
        n = max(1, len(delays))
        return {
            "watchers": watchers,
            "events": events,
            "delivered": len(delays),
            "delay": summary(delays),
            "server_us": (server1 - server0) * 1e6 / n,
            "client_us": (client1 - client0) * 1e6 / n,
        }
    finally:
        for ch in channels:
            with contextlib.suppress(Exception):
                await ch.close()
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--serve", action="store_true", help="run the bare server (prints its port)")
    ap.add_argument("--watchers", type=int, default=1000)
    ap.add_argument("--events", type=int, default=40)
    ap.add_argument("--interval", type=float, default=0.25)
    ap.add_argument("--per-channel", type=int, default=100)
    args = ap.parse_args()
    from spool.runloop import run

    if args.serve:
        run(_serve())
        return
    r = run(measure(args.watchers, args.events, args.interval, args.per_channel))
    d = r["delay"]
    print(
        f"{r['watchers']} watchers x {r['events']} events ({r['delivered']} delivered):"
        f" delay p50 {d['p50']:.1f} / p99 {d['p99']:.1f} ms; CPU per message: server"
        f" {r['server_us']:.0f} us, clients {r['client_us']:.0f} us"
    )


if __name__ == "__main__":
    main()
