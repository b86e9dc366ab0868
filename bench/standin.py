"""A minimal, fast Braze stand-in for the benchmarks: accepts `/users/track` and counts.

`python -m bench.standin --port N` listens on 127.0.0.1 only. Every `/users/track` body is parsed
and counted: requests, event objects, attributes objects, events carrying an `external_id`, and
requests above `--max-objects` (a violation of Braze's cap). It answers 201 like Braze, without
rate-limit headers, so only the relay's own speed shows. When `--receipts` is on, the receipt
time (epoch seconds) of every event is kept by its `extole_event_id`, for the latency benchmark.

`GET /stats` answers the counters; `GET /receipts` the receipt times; `POST /reset` zeroes both.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

OK = b'{"message":"success"}'


class Counters:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.requests = 0
        self.events = 0
        self.attributes = 0
        self.with_external_id = 0
        self.over_cap = 0
        self.max_objects_seen = 0
        self.first = None
        self.last = None
        self.receipts: dict[str, float] = {}

    def stats(self) -> dict[str, Any]:
        span = (self.last - self.first) if self.first and self.last else 0.0
        return {"requests": self.requests, "events": self.events,
                "attributes": self.attributes, "with_external_id": self.with_external_id,
                "over_cap": self.over_cap, "max_objects_seen": self.max_objects_seen,
                "first": self.first, "last": self.last, "span": span}


def make_handler(counters: Counters, max_objects: int, keep_receipts: bool) -> Any:
    def track(body: bytes) -> None:
        now = time.time()
        data = json.loads(body)
        events = data.get("events") or []
        attributes = data.get("attributes") or []
        objects = len(events) + len(attributes)
        counters.requests += 1
        counters.events += len(events)
        counters.attributes += len(attributes)
        counters.with_external_id += sum(1 for e in events if e.get("external_id"))
        counters.max_objects_seen = max(counters.max_objects_seen, objects)
        if objects > max_objects:
            counters.over_cap += 1
        if counters.first is None:
            counters.first = now
        counters.last = now
        if keep_receipts:
            for event in events:
                key = (event.get("properties") or {}).get("extole_event_id")
                if key is not None:
                    counters.receipts.setdefault(str(key), now)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                length = 0
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value.strip())
                body = await reader.readexactly(length) if length else b""
                status, answer = "200 OK", b"{}"
                if method == "POST" and path == "/users/track":
                    track(body)
                    status, answer = "201 Created", OK
                elif method == "POST" and path == "/users/export/ids":
                    answer = b'{"users":[],"message":"success"}'
                elif path == "/stats":
                    answer = json.dumps(counters.stats()).encode()
                elif path == "/receipts":
                    answer = json.dumps(counters.receipts).encode()
                elif method == "POST" and path == "/reset":
                    counters.reset()
                else:
                    status, answer = "404 Not Found", b'{"message":"not found"}'
                writer.write(f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
                             f"Content-Length: {len(answer)}\r\n\r\n".encode() + answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()

    return handle


async def serve(port: int, max_objects: int, keep_receipts: bool, max_seconds: float) -> None:
    counters = Counters()
    server = await asyncio.start_server(make_handler(counters, max_objects, keep_receipts),
                                        "127.0.0.1", port, backlog=512)
    print(f"braze stand-in on 127.0.0.1:{port}", flush=True)
    async with server:
        # Bounded: the stand-in ends by itself even if the benchmark that started it did not.
        await asyncio.sleep(max_seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max-objects", type=int, default=75)
    parser.add_argument("--receipts", action="store_true")
    parser.add_argument("--max-seconds", type=float, default=1800.0)
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.max_objects, args.receipts, args.max_seconds))


if __name__ == "__main__":
    main()
