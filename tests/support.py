"""Constants and helpers shared by tests (fixtures live in conftest.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from relay.authentication import sign

SAMPLES = Path(__file__).parent / "samples"
PG_ADMIN_URL = os.environ.get(
    "RELAY_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
PROD_SECRET = "prod-secret-0123456789"
STAGING_SECRET = "staging-secret-9876543210"
BRAZE_URL = "https://rest.iad-01.braze.com"
PROD_KEY = "prod-braze-key-aaaa"
STAGING_KEY = "staging-braze-key-bbbb"


def sample(name: str) -> bytes:
    return (SAMPLES / name).read_bytes()


def sample_json(name: str) -> Any:
    return json.loads(sample(name))


def signed(body: bytes, secret: str = PROD_SECRET) -> dict[str, str]:
    return {"Content-Type": "application/json", "X-Extole-Signature": sign(body, secret)}
