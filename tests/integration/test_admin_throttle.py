"""Failed admin sign-ins are counted in the database, per user name and per client address:
after 10 failures in 15 minutes further attempts get 429 with Retry-After, in every process at
once, however many guesses arrive together, with rotating or forged addresses."""

from __future__ import annotations

import base64
import threading
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select

from relay import create_app
from relay.admin.auth import FAILURE_WINDOW, MAX_FAILURES, LoginThrottle, state
from relay.db import get_db, utcnow
from relay.models import AdminLoginFailure
from relay.settings import Settings
from tests.integration.test_admin_pages import PASSWORD, form_token


def attempt(client: FlaskClient, password: str, user: str = "admin",
            address: str = "127.0.0.1", headers: dict[str, str] | None = None) -> Any:
    """One sign-in through the form, from `address`."""
    environ = {"REMOTE_ADDR": address}
    token = form_token(client.get("/admin/login", environ_base=environ).text)
    return client.post("/admin/login", environ_base=environ, headers=headers or {},
                       data={"username": user, "password": password, "csrf_token": token})


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def failure_rows(app: Flask) -> Counter[str]:
    with get_db(app).session() as session:
        return Counter(session.scalars(select(AdminLoginFailure.scope)))


def test_ten_failures_then_429_with_retry_after_even_for_the_right_password(
        app: Flask, client: FlaskClient) -> None:
    for _ in range(MAX_FAILURES):
        assert attempt(client, "guess").status_code == 401
    refused = attempt(client, PASSWORD)
    assert refused.status_code == 429
    assert "too many failed sign-ins for this user name: try again in about 15 minutes" in (
        refused.text)
    assert 880 <= int(refused.headers["Retry-After"]) <= 900
    assert client.get("/admin/").status_code == 302  # no session was opened
    assert failure_rows(app) == {"user": 10, "address": 10}  # refusals are not counted


def test_rotating_addresses_do_not_help(app: Flask, client: FlaskClient) -> None:
    for n in range(MAX_FAILURES):
        assert attempt(client, f"guess-{n}", address=f"198.51.100.{n}").status_code == 401
    refused = attempt(client, PASSWORD, address="203.0.113.77")
    assert refused.status_code == 429
    assert "for this user name" in refused.text
    assert int(refused.headers["Retry-After"]) > 0


def test_rotating_user_names_do_not_help_one_address(client: FlaskClient) -> None:
    for n in range(MAX_FAILURES):
        assert attempt(client, "guess", user=f"user-{n}").status_code == 401
    refused = attempt(client, "guess", user="yet-another")
    assert refused.status_code == 429
    assert "too many failed sign-ins from your address" in refused.text
    # the operator elsewhere is not locked out by this address's guesses
    assert attempt(client, PASSWORD, address="192.0.2.10").status_code == 302


def test_a_forged_x_forwarded_for_does_not_rotate_addresses(client: FlaskClient) -> None:
    """Without RELAY_PROXY_FIX nothing the client writes changes its address."""
    for n in range(MAX_FAILURES):
        answer = attempt(client, "guess", user=f"user-{n}",
                         headers={"X-Forwarded-For": f"203.0.113.{n}",
                                  "X-Real-IP": f"203.0.113.{n}", "Forwarded": f"for=10.0.0.{n}"})
        assert answer.status_code == 401
    refused = attempt(client, "guess", user="another",
                      headers={"X-Forwarded-For": "198.51.100.200"})
    assert refused.status_code == 429 and "from your address" in refused.text


def test_behind_a_trusted_proxy_the_forwarded_address_counts(
        make_settings: Callable[..., Settings]) -> None:
    """With RELAY_PROXY_FIX=1 the entry the proxy appended to X-Forwarded-For is the client's
    address; whatever the client put ahead of it is not taken."""
    proxied = create_app(make_settings(proxy_fix=1), TESTING=True)
    try:
        client = proxied.test_client()
        for n in range(MAX_FAILURES):
            forwarded = {"X-Forwarded-For": f"203.0.113.{n}, 198.51.100.7"}
            assert attempt(client, "guess", user=f"user-{n}", headers=forwarded).status_code == 401
        again = {"X-Forwarded-For": "203.0.113.99, 198.51.100.7"}
        refused = attempt(client, "guess", user="x", headers=again)
        assert refused.status_code == 429 and "from your address" in refused.text
        other_client = {"X-Forwarded-For": "198.51.100.8"}
        assert attempt(client, PASSWORD, headers=other_client).status_code == 302
    finally:
        get_db(proxied).dispose()


def test_basic_auth_counts_and_is_refused_with_json(app: Flask, client: FlaskClient) -> None:
    for n in range(MAX_FAILURES):
        answer = client.get("/admin/api/stats", headers=basic("admin", f"guess-{n}"),
                            environ_base={"REMOTE_ADDR": f"198.51.100.{n}"})
        assert answer.status_code == 401
    refused = client.get("/admin/api/stats", headers=basic("admin", PASSWORD))
    assert refused.status_code == 429
    assert refused.is_json and refused.text.startswith(
        '{"error":"too many failed sign-ins for this user name')
    assert int(refused.headers["Retry-After"]) > 0
    # the form shares the count: the same user name is refused there too
    assert attempt(client, PASSWORD, address="192.0.2.1").status_code == 429


def test_a_right_password_does_not_count(app: Flask, client: FlaskClient) -> None:
    for _ in range(MAX_FAILURES - 1):
        assert attempt(client, "guess").status_code == 401
    assert attempt(app.test_client(), PASSWORD).status_code == 302  # its count is released
    assert client.get("/admin/api/stats", headers=basic("admin", PASSWORD)).status_code == 200
    assert attempt(client, "guess").status_code == 401  # the tenth failure
    assert attempt(client, PASSWORD).status_code == 429


def test_the_limit_holds_across_two_processes(app: Flask, second_app: Flask) -> None:
    clients = [app.test_client(), second_app.test_client()]
    answers = [attempt(clients[n % 2], f"guess-{n}", address=f"198.51.100.{n}").status_code
               for n in range(2 * MAX_FAILURES)]
    assert answers == [401] * MAX_FAILURES + [429] * MAX_FAILURES
    for client in clients:  # both processes refuse the right password now
        assert attempt(client, PASSWORD, address="192.0.2.44").status_code == 429


def test_concurrent_guesses_in_two_processes_never_exceed_the_limit(
        app: Flask, second_app: Flask) -> None:
    """40 guesses at once from 8 threads in two "processes", each from its own address: exactly
    10 are checked (401), the rest refused (429), whatever the interleaving."""
    guesses, threads = 40, 8
    statuses: list[int] = []
    lock = threading.Lock()
    start = threading.Barrier(threads)

    def guesser(worker: int) -> None:
        client = (app if worker % 2 else second_app).test_client()
        prepared = []
        for n in range(worker, guesses, threads):
            environ = {"REMOTE_ADDR": f"198.51.{worker}.{n}"}
            token = form_token(client.get("/admin/login", environ_base=environ).text)
            prepared.append((environ, token))
        start.wait()
        for n, (environ, token) in enumerate(prepared):
            answer = client.post("/admin/login", environ_base=environ, data={
                "username": "admin", "password": f"guess-{worker}-{n}", "csrf_token": token})
            with lock:
                statuses.append(answer.status_code)

    pool = [threading.Thread(target=guesser, args=(n,)) for n in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(timeout=120)
    assert sorted(Counter(statuses).items()) == [(401, MAX_FAILURES),
                                                 (429, guesses - MAX_FAILURES)]
    assert failure_rows(app) == {"user": MAX_FAILURES, "address": MAX_FAILURES}


def test_failures_leave_the_window_and_retry_after_counts_down(app: Flask,
                                                               client: FlaskClient) -> None:
    start = utcnow()
    now = [start]
    with app.app_context():
        state().throttle.clock = lambda: now[0]
    for n in range(MAX_FAILURES):
        now[0] = start + timedelta(minutes=n)  # one a minute
        assert attempt(client, "guess").status_code == 401
    now[0] = start + timedelta(minutes=10)
    refused = attempt(client, PASSWORD)
    assert refused.status_code == 429
    assert refused.headers["Retry-After"] == "300"  # the first failure leaves at minute 15
    now[0] = start + FAILURE_WINDOW + timedelta(seconds=1)
    assert attempt(client, "guess").status_code == 401  # one slot free again: the 10th
    assert attempt(client, PASSWORD).status_code == 429
    assert attempt(client, PASSWORD).headers["Retry-After"] == "59"  # the second leaves at 16


def test_old_failures_are_deleted_so_the_table_stays_small(app: Flask) -> None:
    throttle = LoginThrottle(b"test-secret-key")
    db = get_db(app)
    start = utcnow()
    now = [start]
    throttle.clock = lambda: now[0]
    for n in range(1200):  # a flood from rotating addresses with rotating user names
        assert isinstance(throttle.reserve(db, f"user-{n}", f"198.51.{n // 250}.{n % 250}"),
                          list)
    assert sum(failure_rows(app).values()) == 2400
    now[0] = start + FAILURE_WINDOW + timedelta(seconds=1)
    assert throttle.purge(db) == 2400
    assert throttle.reserve(db, "admin", "192.0.2.1") != []
    with get_db(app).session() as session:
        assert session.scalar(select(func.count()).select_from(AdminLoginFailure)) == 2


def test_user_names_and_addresses_are_not_stored_in_clear(app: Flask,
                                                          client: FlaskClient) -> None:
    attempt(client, "guess", user="my-password-typed-here", address="198.51.100.23")
    with get_db(app).session() as session:
        keys = list(session.scalars(select(AdminLoginFailure.key_hash)))
    assert len(keys) == 2
    assert not any("my-password" in key or "198.51" in key for key in keys)
