"""Extole's three key types, constant-time comparison, and headers stored without credentials."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac

import pytest
from werkzeug.datastructures import Headers

from relay import authentication
from relay.authentication import authenticate, redact_headers, sign
from relay.exceptions import AuthenticationFailed

SECRET = "s3cret-key-0123"
BODY = b'{"type":"shared","event_id":"a-1"}'
MISSING = ("missing credentials: send Authorization: Bearer <secret>, Authorization: Basic, "
           "or X-Extole-Signature (HMAC-SHA256 of the body)")


def b64(text: str | bytes) -> str:
    raw = text.encode() if isinstance(text, str) else text
    return base64.b64encode(raw).decode()


def test_sign_is_hmac_sha256_lowercase_hex() -> None:
    expected = hmac.new(SECRET.encode(), BODY, hashlib.sha256).hexdigest()
    assert sign(BODY, SECRET) == expected
    assert expected == expected.lower() and len(expected) == 64
    # RFC 4231 test case 2.
    assert sign(b"what do ya want for nothing?", "Jefe") == (
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843")


@pytest.mark.parametrize(("headers", "method"), [
    ({"X-Extole-Signature": sign(BODY, SECRET)}, "signature"),
    ({"x-extole-signature": sign(BODY, SECRET)}, "signature"),
    ({"X-Extole-Signature": sign(BODY, SECRET).upper()}, "signature"),
    ({"X-Extole-Signature": "sha256=" + sign(BODY, SECRET)}, "signature"),
    ({"X-Extole-Signature": "SHA256=" + sign(BODY, SECRET).upper()}, "signature"),
    ({"X-Extole-Signature": f"  {sign(BODY, SECRET)}  "}, "signature"),
    ({"Authorization": f"Bearer {SECRET}"}, "bearer"),
    ({"Authorization": f"BEARER {SECRET}"}, "bearer"),
    ({"Authorization": f"  Bearer    {SECRET} "}, "bearer"),
    ({"Authorization": f"Basic {b64(SECRET)}"}, "basic"),
    ({"Authorization": f"basic {b64('extole:' + SECRET)}"}, "basic"),
    ({"Authorization": f"Basic {b64(':' + SECRET)}"}, "basic"),
    ({"X-Extole-Signature": "bad", "Authorization": f"Bearer {SECRET}"}, "bearer"),
    ({"X-Extole-Signature": sign(BODY, SECRET), "Authorization": "Bearer bad"}, "signature"),
])
def test_each_key_type_authenticates(headers: dict[str, str], method: str) -> None:
    assert authenticate(Headers(headers), BODY, SECRET) == method


@pytest.mark.parametrize(("headers", "error"), [
    ({}, MISSING),
    ({"Authorization": "   "}, MISSING),
    ({"X-Extole-Signature": sign(BODY, "other")}, "X-Extole-Signature does not match the body"),
    ({"X-Extole-Signature": sign(BODY + b" ", SECRET)},
     "X-Extole-Signature does not match the body"),
    ({"X-Extole-Signature": sign(BODY, SECRET)[:-1]},
     "X-Extole-Signature does not match the body"),
    ({"X-Extole-Signature": "sha1=" + sign(BODY, SECRET)},
     "X-Extole-Signature does not match the body"),
    ({"X-Extole-Signature": ""}, "X-Extole-Signature does not match the body"),
    ({"X-Extole-Signature": "é" * 64}, "X-Extole-Signature does not match the body"),
    ({"Authorization": "Bearer other"}, "invalid bearer token"),
    ({"Authorization": f"Bearer {SECRET}x"}, "invalid bearer token"),
    ({"Authorization": f"Bearer {SECRET[:-1]}"}, "invalid bearer token"),
    ({"Authorization": "Bearer"}, "invalid bearer token"),
    ({"Authorization": f"Basic {b64('extole:other')}"}, "invalid basic credentials"),
    ({"Authorization": f"Basic {b64(SECRET + ':extole')}"}, "invalid basic credentials"),
    ({"Authorization": f"Basic {b64('')}"}, "invalid basic credentials"),
    ({"Authorization": "Basic not-base64!"}, "malformed basic credentials"),
    ({"Authorization": "Basic " + b64(b"\xff\xfe")}, "malformed basic credentials"),
    ({"Authorization": "Digest abc"},
     "unsupported authorization scheme 'Digest': use Bearer <secret> or Basic"),
    ({"Authorization": SECRET}, "unsupported authorization scheme: use Bearer <secret> or Basic"),
    ({"Authorization": f"{SECRET} {SECRET}"},
     "unsupported authorization scheme: use Bearer <secret> or Basic"),
])
def test_missing_or_wrong_credentials_fail_with_a_safe_message(headers: dict[str, str],
                                                               error: str) -> None:
    with pytest.raises(AuthenticationFailed) as caught:
        authenticate(Headers(headers), BODY, SECRET)
    assert str(caught.value) == error
    assert SECRET not in str(caught.value)


def test_the_other_environments_secret_never_works() -> None:
    production, staging = "prod-key", "staging-key"
    for headers in ({"X-Extole-Signature": sign(BODY, staging)},
                    {"Authorization": f"Bearer {staging}"},
                    {"Authorization": f"Basic {b64(staging)}"},
                    {"Authorization": f"Basic {b64('u:' + staging)}"}):
        with pytest.raises(AuthenticationFailed):
            authenticate(Headers(headers), BODY, production)


def test_secrets_with_colons_and_unicode() -> None:
    secret = "pa:ss:wörd"
    assert authenticate(Headers({"Authorization": f"Basic {b64(secret)}"}), BODY, secret) == "basic"
    assert authenticate(Headers({"Authorization": f"Basic {b64('u:' + secret)}"}), BODY,
                        secret) == "basic"
    assert authenticate(Headers({"X-Extole-Signature": sign(BODY, secret)}), BODY,
                        secret) == "signature"


@pytest.mark.parametrize("headers", [
    {"X-Extole-Signature": sign(BODY, SECRET)},
    {"X-Extole-Signature": "wrong"},
    {"Authorization": f"Bearer {SECRET}"},
    {"Authorization": "Bearer wrong"},
    {"Authorization": f"Basic {b64('u:' + SECRET)}"},
    {"Authorization": f"Basic {b64('u:wrong')}"},
])
def test_comparisons_are_constant_time(monkeypatch: pytest.MonkeyPatch,
                                       headers: dict[str, str]) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(authentication.hmac, "compare_digest", spy)
    with contextlib.suppress(AuthenticationFailed):
        authenticate(Headers(headers), BODY, SECRET)
    assert calls, "every credential is compared with hmac.compare_digest"
    assert all(isinstance(a, bytes) and isinstance(b, bytes) for a, b in calls)


def test_redacted_headers_keep_no_credential() -> None:
    headers = Headers([
        ("Authorization", f"Bearer {SECRET}"),
        ("Proxy-Authorization", f"Basic {b64('p:' + SECRET)}"),
        ("X-Extole-Signature", sign(BODY, SECRET)),
        ("Cookie", f"session={SECRET}"),
        ("X-Webhook-Secret", SECRET),
        ("X-Auth-Token", SECRET),
        ("X-Api-Key", SECRET),
        ("X-ApiKey", SECRET),
        ("X-Password", SECRET),
        ("User-Agent", "Extole-Webhooks/1.0"),
        ("X-Long", "v" * 5000),
        ("X-Nul", "a\x00b"),
    ])
    redacted = redact_headers(headers)
    assert redacted == {
        "Authorization": "Bearer [redacted]",
        "Proxy-Authorization": "Basic [redacted]",
        "X-Extole-Signature": "[redacted]",
        "Cookie": "[redacted]",
        "X-Webhook-Secret": "[redacted]",
        "X-Auth-Token": "[redacted]",
        "X-Api-Key": "[redacted]",
        "X-ApiKey": "[redacted]",
        "X-Password": "[redacted]",
        "User-Agent": "Extole-Webhooks/1.0",
        "X-Long": "v" * 1000,
        "X-Nul": "a\ufffdb",
    }


@pytest.mark.parametrize(("value", "stored"), [
    (f"Bearer {SECRET}", "Bearer [redacted]"),
    (f"Basic {b64(SECRET)}", "Basic [redacted]"),
    ("Digest username=x", "Digest [redacted]"),
    (SECRET, "[redacted]"),  # a bare credential: no scheme to keep
    (f"{SECRET} trailing", "[redacted]"),
    ("", "[redacted]"),
])
def test_authorization_keeps_only_a_known_scheme(value: str, stored: str) -> None:
    assert redact_headers({"Authorization": value}) == {"Authorization": stored}
