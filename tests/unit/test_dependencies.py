"""The lock files pin every dependency of setup.cfg, with hashes, within its bounds; the bounds
leave out versions with published security fixes; and this environment was installed from the
test lock (what `make test`, and so CI, does)."""

from __future__ import annotations

import configparser
import re
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "requirements.lock"
TEST_LOCK = ROOT / "requirements-test.lock"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")


def declared(section: str, option: str) -> list[Requirement]:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    lines = config.get(section, option).splitlines()
    return [Requirement(line.strip()) for line in lines if line.strip()]


def runtime() -> list[Requirement]:
    return declared("options", "install_requires")


def extra_test() -> list[Requirement]:
    return declared("options.extras_require", "test")


def pins(path: Path) -> dict[str, tuple[Version, int]]:
    """name -> (pinned version, number of hashes); fails on any line that is not a pin."""
    found: dict[str, tuple[Version, int]] = {}
    entries = re.split(r"\n(?=\S)", path.read_text())
    for entry in entries:
        logical = entry.replace("\\\n", " ")
        first = logical.strip().splitlines()[0] if logical.strip() else ""
        if not first or first.startswith("#"):
            continue
        match = PIN.match(first)
        assert match, f"{path.name}: not an exact pin: {first[:80]!r}"
        hashes = re.findall(r"--hash=sha256:[0-9a-f]{64}", logical)
        found[canonicalize_name(match.group(1))] = (Version(match.group(2)), len(hashes))
    return found


@pytest.mark.parametrize("lock", [LOCK, TEST_LOCK], ids=lambda p: p.name)
def test_every_line_is_an_exact_pin_with_hashes(lock: Path) -> None:
    pinned = pins(lock)
    assert pinned, f"{lock.name} pins nothing"
    assert all(count >= 1 for _, count in pinned.values()), {
        name: count for name, (_, count) in pinned.items() if count < 1}
    assert "--find-links" not in lock.read_text() and "--index-url" not in lock.read_text()


@pytest.mark.parametrize(("lock", "groups"), [(LOCK, ("runtime",)),
                                              (TEST_LOCK, ("runtime", "test"))],
                         ids=["requirements.lock", "requirements-test.lock"])
def test_the_lock_covers_setup_cfg_within_its_bounds(lock: Path, groups: tuple[str, ...]) -> None:
    pinned = pins(lock)
    requirements = runtime() + (extra_test() if "test" in groups else [])
    for requirement in requirements:
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"{requirement} is not pinned in {lock.name}: run `make lock`"
        version = pinned[name][0]
        assert requirement.specifier.contains(version, prereleases=True), (
            f"{lock.name} pins {name}=={version}, outside setup.cfg's {requirement}")
        for extra in requirement.extras:  # psycopg[binary] brings psycopg-binary, same version
            companion = canonicalize_name(f"{name}-{extra}")
            assert pinned.get(companion, (None, 0))[0] == version, (companion, lock.name)


def test_the_two_locks_agree() -> None:
    runtime_pins, test_pins = pins(LOCK), pins(TEST_LOCK)
    assert {name: test_pins.get(name, (None, 0))[0] for name in runtime_pins} == {
        name: version for name, (version, _) in runtime_pins.items()}


@pytest.mark.parametrize(("package", "fixed", "vulnerable"), [
    ("gunicorn", "23.0.0", "22.0.0"),  # request smuggling (CVE-2024-6827)
    ("werkzeug", "3.1.6", "3.0.5"),  # multipart exhaustion, safe_join (CVE-2024-49767, ...)
    ("requests", "2.32.4", "2.32.3"),  # .netrc credentials leak (CVE-2024-47081)
    ("flask", "3.1.3", "3.1.2"),  # session not marked accessed (GHSA-68rp-wp8r-4726)
    ("jinja2", "3.1.6", "3.1.5"),  # sandbox escape through |attr (CVE-2025-27516)
    ("urllib3", "2.7.0", "2.6.3"),  # decompression bomb in streaming reads (CVE-2026-44432)
])
def test_lower_bounds_leave_out_versions_with_published_fixes(package: str, fixed: str,
                                                              vulnerable: str) -> None:
    (requirement,) = [r for r in runtime() if canonicalize_name(r.name) == package]
    assert requirement.specifier.contains(fixed)
    assert not requirement.specifier.contains(vulnerable)


def test_this_environment_was_installed_from_the_test_lock() -> None:
    """`make test` installs `requirements-test.lock` and then relay with --no-deps."""
    wrong: dict[str, tuple[str, str | None]] = {}
    for name, (version, _) in pins(TEST_LOCK).items():
        try:
            installed = Version(metadata.version(name))
        except metadata.PackageNotFoundError:
            wrong[name] = (str(version), None)
            continue
        if installed != version:
            wrong[name] = (str(version), str(installed))
    assert not wrong, f"installed versions differ from requirements-test.lock: {wrong}"
