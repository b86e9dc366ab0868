"""An open-loop HTTP/1.1 load generator (asyncio, keep-alive) for steady request rates.

Requests are sent on a fixed schedule whatever the server does (no coordinated omission): the
latency of each request is measured from its scheduled send time to the end of its answer, so a
stalled server shows up as latency, not as a lower rate. Connections are reused; a new one is
opened only when every open connection is busy, up to `max_connections`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class Result:
    index: int  # position in the list of requests
    scheduled: float  # loop time the request was due
    latency: float  # seconds from scheduled to the end of the answer
    status: int  # 0 when the connection failed
    answered_at: float  # wall clock (time.time()) of the end of the answer
    body: bytes


async def _read_answer(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length, close = 0, False
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value.strip())
        elif name == "connection" and value.strip().lower() == "close":
            close = True
    body = await reader.readexactly(length) if length else b""
    return status, body, close


async def _run(port: int, requests: Sequence[bytes], rate: float, max_connections: int,
               timeout: float) -> list[Result]:
    loop = asyncio.get_running_loop()
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    open_count = 0
    results: list[Result] = []
    tasks: set[asyncio.Task[None]] = set()
    gate = asyncio.Semaphore(max_connections)

    async def one(index: int, raw: bytes, scheduled: float) -> None:
        nonlocal open_count
        async with gate:
            connection = idle.pop() if idle else None
            status, body = 0, b""
            try:
                if connection is not None:
                    try:
                        connection[1].write(raw)
                        status, body, close = await asyncio.wait_for(
                            _read_answer(connection[0]), timeout)
                    except (OSError, asyncio.IncompleteReadError):
                        # The server closed an idle keep-alive connection: send on a new one.
                        connection[1].close()
                        open_count -= 1
                        connection = None
                if connection is None:
                    open_count += 1
                    connection = await asyncio.open_connection("127.0.0.1", port)
                    connection[1].write(raw)
                    status, body, close = await asyncio.wait_for(
                        _read_answer(connection[0]), timeout)
                reader, writer = connection
                if close:
                    writer.close()
                    open_count -= 1
                else:
                    idle.append(connection)
            except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError):
                if connection is not None:
                    connection[1].close()
                open_count -= 1
            results.append(Result(index, scheduled, loop.time() - scheduled, status,
                                  time.time(), body))

    start = loop.time() + 0.05
    for index, raw in enumerate(requests):
        scheduled = start + index / rate
        delay = scheduled - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(one(index, raw, scheduled))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks, timeout=timeout + 5)
    for _, writer in idle:
        writer.close()
    return sorted(results, key=lambda r: r.index)


def http_post(path: str, body: bytes, headers: dict[str, str]) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def signed_webhooks(count: int, run: str) -> list[bytes]:
    """`count` HMAC-signed single-event webhook requests, each a new event of this run."""
    from bench.common import signed_body

    requests = []
    for n in range(count):
        body, signature = signed_body(n, run)
        requests.append(http_post("/webhooks/extole/production", body,
                                  {"Content-Type": "application/json",
                                   "X-Extole-Signature": signature}))
    return requests


def run_steady(port: int, requests: Sequence[bytes], rate: float, max_connections: int = 64,
               timeout: float = 10.0) -> list[Result]:
    """Send `requests` (raw HTTP) at `rate` per second; one Result per request."""
    return asyncio.run(_run(port, requests, rate, max_connections, timeout))
