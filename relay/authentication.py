"""Who sent a webhook: Extole's three key types, checked in constant time.

Bearer (key type "password"), Basic (the secret, or `user:secret`), and `X-Extole-Signature`
(HS256: lowercase hex HMAC-SHA256 of the exact raw body; a `sha256=` prefix is tolerated).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Mapping

from werkzeug.datastructures import Headers

from relay.exceptions import AuthenticationFailed
from relay.extole import storable_text as _storable

SIGNATURE_HEADER = "X-Extole-Signature"
# Authorization schemes whose name may be shown (in errors and the inbound log): anything else
# in front of the first space could be a bare credential.
KNOWN_SCHEMES = frozenset(
    {"basic", "bearer", "digest", "token", "negotiate", "ntlm", "hoba", "mutual", "vapid",
     "scram-sha-1", "scram-sha-256", "aws4-hmac-sha256", "oauth", "apikey"}
)


def sign(body: bytes, secret: str) -> str:
    return hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def _same(given: str | bytes, expected: str | bytes) -> bool:
    if isinstance(given, str):
        given = given.encode("utf-8", "surrogateescape")
    if isinstance(expected, str):
        expected = expected.encode("utf-8")
    return hmac.compare_digest(given, expected)


def authenticate_headers(headers: Headers | Mapping[str, str], secret: str) -> str | None:
    """What the headers alone decide, before the body is read: the method when Bearer or Basic
    credentials are right; None when an `X-Extole-Signature` must be checked against the body;
    AuthenticationFailed otherwise (missing credentials, a wrong Bearer or Basic secret, an
    unsupported scheme). So a request without the secret never gets its body read, unless it
    carries a signature, which only the body can disprove."""
    signature = headers.get(SIGNATURE_HEADER)
    authorization = (headers.get("Authorization") or "").strip()
    if signature is not None:
        return None
    return _authorization(authorization, secret)


def authenticate(headers: Headers | Mapping[str, str], body: bytes, secret: str) -> str:
    """Return the method that authenticated the request, or raise AuthenticationFailed.

    A signature is checked first; when it does not match, Bearer or Basic credentials sent
    along may still authenticate."""
    signature = headers.get(SIGNATURE_HEADER)
    authorization = (headers.get("Authorization") or "").strip()
    if signature is None:
        return _authorization(authorization, secret)
    given = signature.strip()
    if given[:7].lower() == "sha256=":
        given = given[7:]
    if _same(given.lower(), sign(body, secret)):
        return "signature"
    if not authorization:
        raise AuthenticationFailed(f"{SIGNATURE_HEADER} does not match the body")
    return _authorization(authorization, secret)


def _authorization(authorization: str, secret: str) -> str:
    """Bearer or Basic credentials checked against the secret: the method, or the refusal."""
    if not authorization:
        raise AuthenticationFailed(
            "missing credentials: send Authorization: Bearer <secret>, Authorization: Basic, "
            f"or {SIGNATURE_HEADER} (HMAC-SHA256 of the body)"
        )
    scheme, _, value = authorization.partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer":
        if _same(value, secret):
            return "bearer"
        raise AuthenticationFailed("invalid bearer token")
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(value, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raise AuthenticationFailed("malformed basic credentials") from None
        password = decoded.partition(":")[2] if ":" in decoded else decoded
        # Both forms are compared every time, so timing does not reveal which one was used.
        whole, split = _same(decoded, secret), _same(password, secret)
        if whole or split:
            return "basic"
        raise AuthenticationFailed("invalid basic credentials")
    # Echo the scheme only when it is a known one: a bare credential (no scheme) must not
    # come back in the answer, the inbound log or the logs.
    shown = f" {scheme!r}" if scheme.lower() in KNOWN_SCHEMES else ""
    raise AuthenticationFailed(
        f"unsupported authorization scheme{shown}: use Bearer <secret> or Basic"
    )


def redact_headers(headers: Headers | Mapping[str, str]) -> dict[str, str]:
    """Headers for the inbound log: credentials replaced, a known scheme kept for diagnosis.

    NUL characters and lone surrogates (which PostgreSQL's JSONB refuses) become U+FFFD.
    """
    redacted: dict[str, str] = {}
    for name, value in headers.items():
        lower = name.lower()
        if lower in ("authorization", "proxy-authorization"):
            scheme = value.strip().partition(" ")[0]
            kept = scheme[:20] + " " if scheme.lower() in KNOWN_SCHEMES else ""
            redacted[_storable(name)] = kept + "[redacted]"
        elif lower in ("cookie", SIGNATURE_HEADER.lower()) or any(
            word in lower for word in ("secret", "token", "api-key", "apikey", "password")
        ):
            redacted[_storable(name)] = "[redacted]"
        else:
            redacted[_storable(name)] = _storable(value[:1000])
    return redacted
