"""Hostile webhook requests for scenario 8, from a seeded random generator (reproducible).

Each `Attack` is one HTTP request: sent through a `requests` session when it is well-formed HTTP,
or written byte by byte on a raw socket (oversized or broken headers, slow and abandoned bodies,
chunked bodies, lying Content-Length). Most carry a valid signature, so they reach the parser
and the outbox rather than stopping at 401.
"""

from __future__ import annotations

import base64
import json
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from relay.authentication import sign
from tests.reliability.harness import PROD_SECRET, STAGING_SECRET, make_event

FIELDS = ("type", "event_id", "event_time", "partner_user_id", "email", "person", "data",
          "reward_id", "face_value", "face_value_type", "first_name", "last_name",
          "phone_number", "share_link", "funnel", "program", "id", "event", "timestamp",
          "external_id")


@dataclass
class Attack:
    kind: str
    body: bytes = b""
    environment: str = "production"
    headers: dict[str, str] = field(default_factory=dict)
    raw: list[tuple[bytes, float]] | None = None  # pieces and the pause after each
    hang_up: bool = False  # the client stops sending (half-closes) before the body is complete
    valid_id: str | None = None  # a valid event that must be stored

    @property
    def path(self) -> str:
        return f"/webhooks/extole/{self.environment}"


def signed_headers(body: bytes, secret: str = PROD_SECRET,
                   content_type: str = "application/json") -> dict[str, str]:
    return {"Content-Type": content_type, "X-Extole-Signature": sign(body, secret)}


class Generator:
    def __init__(self, seed: int, tag: str) -> None:
        self.rng = random.Random(seed)
        self.tag = tag
        self.count = 0

    # -- values ----------------------------------------------------------------------------

    def text(self, longest: int = 40) -> str:
        rng = self.rng
        alphabet = ["a", "Z", "0", " ", "\"", "\\", "/", "\n", "\t", "\x00", "\x7f", "é", "ß",
                    "\u2028", "\ud800", "\udfff", "\U0001f600", "\ufeff", "'", ";", "--", "$",
                    "{", "]", "%s", "<script>", "\u202e"]
        return "".join(rng.choice(alphabet) for _ in range(rng.randrange(longest)))

    def value(self, depth: int = 0) -> Any:
        rng = self.rng
        kind = rng.randrange(12 if depth < 4 else 8)
        return [
            lambda: None, lambda: rng.choice([True, False]),
            lambda: rng.randrange(-(2**70), 2**70),
            lambda: rng.choice([0.0, -0.0, 1e308, -1e308, 5e-324, 1.5, 1e15, 1e11 + 0.5]),
            lambda: self.text(), lambda: "x" * rng.choice([256, 1000, 70_000]),
            lambda: rng.choice(["2026-11-20T14:14:18Z", "2026-02-30T00:00:00Z", "9999-12-31",
                                "0000-01-01T00:00:00", "yesterday", "", " ", "1e400",
                                "-1", "253402300800", "NaN"]),
            lambda: str(rng.randrange(10**30)),
            lambda: [self.value(depth + 1) for _ in range(rng.randrange(4))],
            lambda: {self.text(8): self.value(depth + 1) for _ in range(rng.randrange(4))},
            lambda: {"$bad": 1, "": self.value(depth + 1), "a" * 300: 1},
            lambda: [[[[[[[[]]]]]]]],
        ][kind]()

    def event_id(self) -> str:
        self.count += 1
        return f"{self.tag}-h{self.count}"

    # -- attacks ---------------------------------------------------------------------------

    def valid(self) -> Attack:
        event_id = self.event_id()
        event = make_event(event_id, f"{self.tag}-v{self.rng.randrange(500)}",
                           seq=self.count, email=self.rng.random() < 0.5)
        body = json.dumps(event).encode()
        if self.rng.random() < 0.3:
            return Attack("valid (bearer)", body, headers={
                "Content-Type": "application/json", "Authorization": f"Bearer {PROD_SECRET}"},
                valid_id=event_id)
        return Attack("valid", body, headers=signed_headers(body), valid_id=event_id)

    def random_bytes(self) -> Attack:
        body = self.rng.randbytes(self.rng.choice([0, 1, 7, 100, 4096, 65536]))
        content_type = self.rng.choice([
            "application/json", "application/json; charset=latin-1", "text/plain",
            "application/x-www-form-urlencoded", "application/vnd.extole+json"])
        return Attack("random bytes", body, headers=signed_headers(body, content_type=content_type))

    def deep_nesting(self) -> Attack:
        depth = self.rng.choice([65, 1000, 10_000, 10_000])
        shape = self.rng.randrange(3)
        if shape == 0:
            body = b"[" * depth + b"]" * depth
        elif shape == 1:
            body = b'{"a":' * depth + b"1" + b"}" * depth
        else:  # a valid event whose data is nested that deep
            body = (b'{"type":"shared","event_id":"' + self.event_id().encode()
                    + b'","partner_user_id":"n","data":' + b'{"a":' * depth + b"1"
                    + b"}" * depth + b"}")
        return Attack(f"nesting {depth}", body, headers=signed_headers(body))

    def huge_number(self) -> Attack:
        digits = self.rng.choice([20, 400, 4300, 4301, 100_000])
        number = self.rng.choice(["1" * digits, "-" + "9" * digits, "1e999999", "-1e-999999",
                                  "0." + "0" * digits + "1", "1" + "0" * digits + ".5"])
        where = self.rng.choice(["event_time", "face_value", "event_id", "partner_user_id"])
        event = make_event(self.event_id(), "big", seq=1)
        text = json.dumps(event).replace(json.dumps(event[where]) if where in event else '"x"',
                                         number, 1)
        if where not in event:
            text = text[:-1] + f', "{where}": {number}}}'
        body = text.encode()
        return Attack("huge number", body, headers=signed_headers(body))

    def invalid_utf8(self) -> Attack:
        event = json.dumps(make_event(self.event_id(), "u", seq=1)).encode()
        bad = self.rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80",
                               b"\xc0\xaf", b"\x80", b"\xe2\x82"])
        position = self.rng.randrange(1, len(event) - 1)
        body = event[:position] + bad + event[position:]
        return Attack("invalid utf-8", body, headers=signed_headers(body))

    def duplicate_keys(self) -> Attack:
        event_id = self.event_id()
        key = self.rng.choice(["event_id", "type", "event_time", "partner_user_id", "email"])
        body = (f'{{"type": "shared", "event_id": "{event_id}", "partner_user_id": "d", '
                f'"event_time": "2026-11-20T00:00:00Z", "{key}": {json.dumps(self.value())}, '
                f'"{key.upper()}": {json.dumps(self.value())}}}').encode()
        return Attack("duplicate keys", body, headers=signed_headers(body))

    def wrong_types(self) -> Attack:
        rng = self.rng
        event: dict[str, Any] = make_event(self.event_id(), "w", seq=rng.randrange(10**6))
        for name in rng.sample(FIELDS, rng.randrange(1, len(FIELDS))):
            event[name] = self.value()
        items: Any = event
        if rng.random() < 0.2:
            items = [event, self.value(), make_event(self.event_id(), "w2"), None, []]
        body = json.dumps(items, ensure_ascii=rng.random() < 0.5).encode("utf-8", "surrogatepass")
        environment = rng.choice(["production", "production", "staging"])
        secret = PROD_SECRET if environment == "production" else STAGING_SECRET
        return Attack("wrong types", body, environment, headers=signed_headers(body, secret))

    def json_edges(self) -> Attack:
        body = self.rng.choice([
            b"", b" ", b"null", b"1", b'"text"', b"[]", b"{}", b"[[]]", b"[{}]", b"NaN",
            b'{"type": NaN}', b'{"type": Infinity}', b"\xef\xbb\xbf{}", b'{"type": "a"}garbage',
            b'{"type": "\\ud800", "event_id": "\\u0000"}', b'{"\\u0000": "\\u0000", "type": "s"}',
            b'{"type": "shared", "event_id": 1.5e300}', b'{"type": "shared", "event_id": -0}',
            b"[" + b",".join(b'{"type": "x"}' for _ in range(2000)) + b"]",
            b'{"type": "shared", "event_id": true}', b"\x00\x00\x00", b"{'type': 'x'}",
            b'{"type": "shared",}', b'{"type": "shared" "x": 1}',
        ])
        return Attack("json edge", body, headers=signed_headers(body))

    def bad_auth(self) -> Attack:
        rng = self.rng
        body = json.dumps(make_event(self.event_id(), "a")).encode()
        choice = rng.randrange(9)
        headers = {"Content-Type": "application/json"}
        if choice == 0:
            pass  # no credentials
        elif choice == 1:
            headers["X-Extole-Signature"] = sign(body, "wrong-secret")
        elif choice == 2:
            headers["X-Extole-Signature"] = "sha256=" + "0" * rng.choice([0, 10, 64, 5000])
        elif choice == 3:
            printable = "".join(c for c in self.text(60) if " " <= c <= "~")
            headers["Authorization"] = "Bearer " + printable.strip()
        elif choice == 4:
            headers["Authorization"] = "Basic " + base64.b64encode(rng.randbytes(40)).decode()
        elif choice == 5:
            headers["Authorization"] = "Basic !!!not-base64!!!"
        elif choice == 6:
            headers["Authorization"] = "Digest " + "x" * 7000
        elif choice == 7:
            headers["X-Extole-Signature"] = sign(body, STAGING_SECRET)  # the other environment
        else:
            headers["Authorization"] = f"Bearer {PROD_SECRET} "  # trailing space, same secret
        return Attack("bad auth", body, headers=headers)

    def bad_path(self) -> Attack:
        body = json.dumps(make_event(self.event_id(), "p")).encode()
        environment = self.rng.choice(["Production", "dev", "", "production/extra", "%00",
                                       "..%2f..%2fadmin", "é", "x" * 3000])
        return Attack("bad path", body, environment, headers=signed_headers(body))

    def oversized_body(self) -> Attack:
        body = b'{"type": "shared", "data": "' + b"x" * (1024 * 1024 + 10) + b'"}'
        # gunicorn drains at most 64 KiB of a body the app left unread, then closes the
        # connection without saying so in the 413: a client must not reuse it.
        return Attack("oversized body", body,
                      headers={**signed_headers(body), "Connection": "close"})

    def many_items(self) -> Attack:
        items = []
        ids = []
        for _ in range(self.rng.randrange(2, 50)):
            if self.rng.random() < 0.6:
                event = make_event(self.event_id(), f"{self.tag}-m{self.rng.randrange(50)}",
                                   seq=self.rng.randrange(10**6))
                items.append(event)
                ids.append(event["event_id"])
            else:
                items.append(self.value())
        body = json.dumps(items).encode("utf-8", "surrogatepass")
        return Attack("many items", body, headers=signed_headers(body))

    # -- raw HTTP --------------------------------------------------------------------------

    def _request(self, attack: Attack, extra: list[str] | None = None,
                 length: int | None = None) -> bytes:
        lines = [f"POST {attack.path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
        lines += [f"{k}: {v}" for k, v in attack.headers.items()]
        lines += extra or []
        lines.append(f"Content-Length: {len(attack.body) if length is None else length}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def oversized_headers(self) -> Attack:
        rng = self.rng
        attack = self.valid()
        attack.valid_id = None
        choice = rng.randrange(4)
        if choice == 0:
            extra = ["X-Big: " + "y" * rng.choice([8191, 20_000, 100_000])]
        elif choice == 1:
            extra = [f"X-H{i}: {i}" for i in range(rng.choice([101, 500]))]
        elif choice == 2:
            attack.environment = "production?" + "q=" * 5000
            extra = []
        else:
            extra = ["X-Bad\x00Name: 1", "X-Utf8: \xe9\xff"]
        head = self._request(attack, extra)
        attack.kind = "oversized/broken headers"
        attack.raw = [(head + attack.body, 0.0)]
        return attack

    def slow_body(self) -> Attack:
        attack = self.valid() if self.rng.random() < 0.7 else self.wrong_types()
        attack.kind = "slow body" if attack.valid_id else "slow hostile body"
        head = self._request(attack)
        pieces = 6
        size = max(1, len(attack.body) // pieces + 1)
        attack.raw = [(head, 0.2)] + [(attack.body[i:i + size], 0.2)
                                      for i in range(0, len(attack.body), size)]
        return attack

    def abandoned_body(self) -> Attack:
        attack = self.valid()
        attack.valid_id = None  # never completed: must not be stored
        attack.kind = "abandoned body"
        head = self._request(attack, length=len(attack.body) + 500)
        attack.raw = [(head + attack.body[:len(attack.body) // 2], 0.3)]
        attack.hang_up = True
        return attack

    def chunked(self) -> Attack:
        attack = self.valid()
        lines = [f"POST {attack.path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close",
                 "Transfer-Encoding: chunked"] + [f"{k}: {v}" for k, v in attack.headers.items()]
        body = attack.body
        chunks = b"".join(f"{len(body[i:i + 50]):x}\r\n".encode() + body[i:i + 50] + b"\r\n"
                          for i in range(0, len(body), 50)) + b"0\r\n\r\n"
        if self.rng.random() < 0.3:  # a broken chunk size: must be refused, not stored
            chunks = b"zz\r\n" + chunks
            attack.valid_id = None
        attack.kind = "chunked body"
        attack.raw = [(("\r\n".join(lines) + "\r\n\r\n").encode() + chunks, 0.0)]
        return attack

    def lying_length(self) -> Attack:
        attack = self.valid()
        attack.valid_id = None
        attack.kind = "short content-length"
        head = self._request(attack, length=max(0, len(attack.body) - 10))
        attack.raw = [(head + attack.body, 0.0)]
        return attack

    def make(self) -> Attack:
        weighted: list[tuple[int, Callable[[], Attack]]] = [
            (800, self.random_bytes), (200, self.deep_nesting), (400, self.huge_number),
            (400, self.invalid_utf8), (400, self.duplicate_keys), (2500, self.wrong_types),
            (600, self.json_edges), (900, self.bad_auth), (250, self.bad_path),
            (40, self.oversized_body), (300, self.many_items), (200, self.oversized_headers),
            (100, self.slow_body), (30, self.abandoned_body), (100, self.chunked),
            (80, self.lying_length),
        ]
        total = sum(w for w, _ in weighted)
        pick = self.rng.randrange(total)
        for weight, make in weighted:
            if pick < weight:
                return make()
            pick -= weight
        raise AssertionError("unreachable")


def send_raw(port: int, pieces: list[tuple[bytes, float]], hang_up: bool = False,
             timeout: float = 30.0) -> int | None:
    """Write the pieces (pausing after each), read the answer; None when the server closed."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            for piece, pause in pieces:
                sock.sendall(piece)
                if pause:
                    time.sleep(pause)
            if hang_up:
                sock.shutdown(socket.SHUT_WR)
            data = b""
            while b"\r\n" not in data:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
    except (ConnectionResetError, BrokenPipeError, TimeoutError):
        return None
    if not data.startswith(b"HTTP/"):
        return None
    return int(data.split(b" ", 2)[1])
