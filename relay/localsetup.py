"""A working, secured local setup for a newcomer: what `make run` does before serving."""

from __future__ import annotations

import json
import os
import secrets
import shlex
import sys
from pathlib import Path

from relay.authentication import sign
from relay.settings import Settings

# A reward as Extole's reward webhook posts it when its body is left as is: the type is the
# reward's state, the coupon is `partner_reward_id` and the face value a decimal string.
SAMPLE_EVENT = {
    "event_id": "local-test-0001",
    "event_time": "2026-11-21T09:02:44.120Z",
    "type": "FULFILLED",
    "reward_id": "c93e7a1f5b2d4c6e8a0f1b3d",
    "reward_name": "Advocate 20% off",
    "reward_supplier_type": "MANUAL_COUPON",
    "partner_reward_key_type": "COUPON",
    "partner_reward_id": "ADVOCATE20-LOCAL",
    "person_id": "6816411215104951917",
    "partner_user_id": "cust-1036950000",
    "email": "ann.lee@example.com",
    "face_value": "20.00",
    "face_value_type": "PERCENT_OFF",
    "data": {"journey_name": "ADVOCATE", "rewardee_role": "advocate"},
}


def write_local_env(path: Path | None = None) -> bool:
    """Create instance/.env with random secrets; an existing file is never overwritten."""
    path = path or Path("instance") / ".env"
    if path.exists():
        return False
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    lines = [
        "# Written by `relay init` (make run) for local use. Replace for production.",
        f"EXTOLE_WEBHOOK_SECRET={secrets.token_hex(24)}",
        f"EXTOLE_STAGING_WEBHOOK_SECRET={secrets.token_hex(24)}",
        "RELAY_ADMIN_USER=admin",
        f"RELAY_ADMIN_PASSWORD={secrets.token_urlsafe(12)}",
        f"RELAY_SECRET_KEY={secrets.token_hex(32)}",
        "# Point these at your Braze workspace (or at `relay sandbox`, as `make demo` does):",
        "# BRAZE_REST_ENDPOINT=https://rest.iad-01.braze.com",
        "# BRAZE_API_KEY=",
        "# BRAZE_STAGING_API_KEY=",
        "",
    ]
    # Created with owner-only permissions from the start: the secrets are never readable by others.
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines))
    path.chmod(0o600)
    return True


def sample_curl(base_url: str, secret: str, environment: str = "production") -> str:
    body = json.dumps(SAMPLE_EVENT, separators=(",", ":"))
    signature = sign(body.encode("utf-8"), secret)
    return (
        f"curl -sS -X POST {base_url}/webhooks/extole/{environment} "
        "-H 'Content-Type: application/json' "
        f"-H 'X-Extole-Signature: {signature}' --data-binary {shlex.quote(body)}"
    )


def instructions(settings: Settings, base_url: str = "http://127.0.0.1:8000") -> str:
    lines = [f"relay will serve on {base_url}"]
    if settings.admin_password:
        lines.append(f"admin page: {base_url}/admin/ (user {settings.admin_user}, "
                     "password: RELAY_ADMIN_PASSWORD in instance/.env)")
    if settings.extole_webhook_secret:
        lines.append("send a signed test webhook:")
        lines.append("  " + sample_curl(base_url, settings.extole_webhook_secret))
    if not settings.braze_api_key:
        lines.append("BRAZE_API_KEY is not set: events are stored and wait (see instance/.env)")
    return "\n".join(lines)


def warn_if_not_migrated(settings: Settings) -> None:
    from relay import migrate
    from relay.db import make_engine

    try:
        engine = make_engine(settings.database_url)
        current = migrate.current_revision(engine)
        engine.dispose()
    except Exception as error:  # noqa: BLE001 - a warning only; serving reports it per request
        print(f"relay: warning: database not reachable yet ({type(error).__name__})",
              file=sys.stderr)
        return
    if current != migrate.head_revision():
        print("relay: warning: database schema is not at the newest migration: "
              "run `relay db upgrade`", file=sys.stderr)
