"""relay installed as a new user installs it: a wheel in a fresh virtualenv outside the checkout.

Every other test runs from the editable checkout, where files beside the package are found by
accident; here only what the wheel carries exists. From a working directory of its own, the
installed `relay` migrates SQLite and a new PostgreSQL database, passes `check-config` against a
Braze sandbox, and serves a signed webhook that is answered 200 and stored. The wheel is built
from the files git knows (tracked or not ignored), copied out of the checkout first.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
from sqlalchemy.engine import make_url

from relay.authentication import sign
from tests.support import (
    PROD_SECRET,
    STAGING_SECRET,
    Background,
    free_port,
    fresh_database,
    sample,
)

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
ADMIN_PASSWORD = "wheel-admin-password"
BRAZE_KEY = "wheel-braze-key"


def _run(*command: str | Path, cwd: Path, env: dict[str, str] | None = None,
         timeout: float = 300) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(part) for part in command], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{command}: {result.stdout}\n{result.stderr}"
    return result


def _source_files() -> list[str]:
    listed = _run("git", "ls-files", "--cached", "--others", "--exclude-standard", "-z",
                  cwd=ROOT).stdout
    return [name for name in listed.split("\0") if name and (ROOT / name).is_file()]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `bin` directory of a fresh virtualenv with only relay's wheel (and its
    dependencies from the package index) installed."""
    base = tmp_path_factory.mktemp("wheel")
    source = base / "source"
    for name in _source_files():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir",
         base / "dist", source, cwd=base)
    [wheel] = (base / "dist").glob("relay-*.whl")
    shutil.rmtree(source)
    venv = base / "venv"
    _run(sys.executable, "-m", "venv", venv, cwd=base)
    _run(venv / "bin" / "python", "-m", "pip", "install", "--quiet", wheel, cwd=base)
    return venv / "bin"


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "work").mkdir()
    return tmp_path / "work"


@pytest.fixture
def environ(workdir: Path) -> dict[str, str]:
    """The machine's environment without relay settings or a path into the checkout."""
    base = {key: value for key, value in os.environ.items()
            if not key.startswith(("RELAY_", "BRAZE_", "EXTOLE_", "PROMETHEUS_", "PYTHON",
                                   "VIRTUAL_ENV"))}
    return {**base, "TMPDIR": str(workdir), "RELAY_DATABASE_URL": f"sqlite:///{workdir}/r.db"}


@pytest.fixture
def relay(installed: Path, workdir: Path,
          environ: dict[str, str]) -> Callable[..., subprocess.CompletedProcess[str]]:
    def run(*args: str, **settings: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(installed / "relay"), *args], cwd=workdir,
                              env={**environ, **settings}, capture_output=True, text=True,
                              timeout=120)

    return run


@pytest.fixture
def spawn(installed: Path, workdir: Path, environ: dict[str, str]) -> Iterator[Background]:
    """The installed `relay ARGS` in the background, stopped at the end of the test."""
    background = Background([str(installed / "relay")], environ, workdir)
    yield background
    background.stop_all()


def test_the_wheel_carries_the_package_and_nothing_of_the_checkout(
        installed: Path, workdir: Path, environ: dict[str, str]) -> None:
    where = _run(installed / "python", "-c", "import relay, relay.migrate as m; "
                 "print(relay.__file__); print(m.script_location())", cwd=workdir, env=environ)
    package, migrations = where.stdout.splitlines()
    site = installed.parent / "lib"
    assert Path(package).is_relative_to(site) and Path(migrations).is_relative_to(site)
    assert not Path(package).is_relative_to(ROOT)


def test_db_upgrade_on_sqlite_from_anywhere(relay: Callable[..., subprocess.CompletedProcess[str]],
                                            workdir: Path) -> None:
    upgraded = relay("db", "upgrade")
    assert (upgraded.returncode, upgraded.stderr) == (0, "")
    assert upgraded.stdout.startswith("database at 0")
    head = upgraded.stdout.split()[-1]
    assert (workdir / "r.db").is_file()
    assert relay("db", "current").stdout == f"{head} (newest)\n"
    history = relay("db", "history").stdout.splitlines()
    assert history[-1] == "<base> -> 0001: initial schema"


def test_postgresql_upgrade_check_config_and_one_webhook(
        postgres_server: None, relay: Callable[..., subprocess.CompletedProcess[str]],
        spawn: Background) -> None:
    with fresh_database("relay_wheel") as url:
        braze_port, port = free_port(), free_port()
        settings = {"RELAY_DATABASE_URL": url, "EXTOLE_WEBHOOK_SECRET": PROD_SECRET,
                    "EXTOLE_STAGING_WEBHOOK_SECRET": STAGING_SECRET,
                    "RELAY_ADMIN_PASSWORD": ADMIN_PASSWORD, "RELAY_SECRET_KEY": "wheel-secret",
                    "BRAZE_REST_ENDPOINT": f"http://127.0.0.1:{braze_port}",
                    "BRAZE_API_KEY": BRAZE_KEY}
        upgraded = relay("db", "upgrade", **settings)
        assert (upgraded.returncode, upgraded.stderr) == (0, "")
        head = upgraded.stdout.split()[-1]

        sandbox = spawn("sandbox", "--port", str(braze_port))
        spawn.wait_for(f"http://127.0.0.1:{braze_port}/sandbox/profiles", sandbox)
        checked = relay("check-config", **settings)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        shown = make_url(url).render_as_string(hide_password=True)
        assert checked.stdout.splitlines() == [
            "settings: OK",
            f"database: OK ({shown}, schema {head})",
            "webhook secret production: OK",
            "webhook secret staging: OK",
            "admin: OK (user admin)",
            "braze production: OK",
            "braze staging: not configured (BRAZE_STAGING_API_KEY is not set): staging events "
            "are stored and skipped",
            "extole production: not configured (EXTOLE_API_TOKEN is not set): production is not "
            "reconciled",
            "extole staging: not configured (EXTOLE_STAGING_API_TOKEN is not set): staging is not "
            "reconciled",
        ]
        assert BRAZE_KEY not in checked.stdout + checked.stderr

        server = spawn("serve", "--port", str(port), "--workers", "1", "--threads", "2",
                       **settings)
        base = f"http://127.0.0.1:{port}"
        spawn.wait_for(f"{base}/healthz", server)
        body = sample("reward_earned.json")
        answer = requests.post(f"{base}/webhooks/extole/production", data=body, timeout=10,
                               headers={"Content-Type": "application/json",
                                        "X-Extole-Signature": sign(body, PROD_SECRET)})
        assert answer.status_code == 200, answer.text
        receipt = answer.json()
        assert (receipt["accepted"], receipt["duplicates"], receipt["rejected"]) == (1, 0, [])
        assert requests.get(f"{base}/readyz", timeout=10).json()["status"] == "ok"
        # The admin's templates and static files came with the wheel too.
        assert requests.get(f"{base}/admin/login", timeout=10).status_code == 200
        assert requests.get(f"{base}/admin/static/admin.css", timeout=10).status_code == 200

        shown_event = relay("events", "show", str(receipt["ids"][0]), **settings)
        assert shown_event.returncode == 0, shown_event.stderr
        stored = json.loads(shown_event.stdout)
        expected = json.loads(body)
        assert (stored["status"], stored["extole_event_id"], stored["braze_event"]) == (
            "pending", expected["event_id"], "Earned Reward")
        assert stored["inbound"]["status_code"] == 200
        assert spawn.stop(server) == 0


def test_known_failures_are_one_line(relay: Callable[..., subprocess.CompletedProcess[str]],
                                     workdir: Path) -> None:
    """What an operator meets first, from the installed command: no traceback, one line."""
    (workdir / "broken.db").write_bytes(b"this is not a database" * 300)
    broken = relay("db", "upgrade", RELAY_DATABASE_URL=f"sqlite:///{workdir}/broken.db")
    assert broken.returncode == 5
    assert broken.stderr.splitlines() == [
        "relay: database error: DatabaseError: file is not a database"]
    down = relay("db", "upgrade", RELAY_DATABASE_URL="postgresql+psycopg://relay@127.0.0.1:"
                 f"{free_port()}/relay")
    assert down.returncode == 5
    [line] = down.stderr.splitlines()
    assert line.startswith("relay: database unavailable: OperationalError: ") and "refused" in line
