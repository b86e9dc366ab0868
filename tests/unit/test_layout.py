"""The layout keeps the design visible: one error tree, one seam for the database dialect.

These read the package itself (its classes, its source), so a new module that raises its own
root exception or branches on the database's name fails here, next to the reason.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import relay
from relay.exceptions import RelayError

PACKAGE = Path(relay.__file__).parent


def _modules() -> list[str]:
    return [info.name for info in pkgutil.walk_packages([str(PACKAGE)], "relay.")
            if ".migrations" not in info.name]


def test_every_error_the_relay_defines_is_a_relay_error() -> None:
    defined = []
    for name in _modules():
        module = importlib.import_module(name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == name and issubclass(cls, BaseException):
                defined.append(cls)
    assert len(defined) >= 15  # the walk found the package's errors
    stray = [f"{cls.__module__}.{cls.__qualname__}" for cls in defined
             if not issubclass(cls, RelayError)]
    assert stray == []


def test_only_the_dialect_module_asks_which_database_it_is() -> None:
    asking = re.compile(r"\.dialect\.name\b|get_bind\(\)\.dialect|== *\"postgresql\"")
    found = [f"{path.relative_to(PACKAGE.parent)}:{number}"
             for path in sorted(PACKAGE.rglob("*.py")) if path.name != "dialect.py"
             for number, line in enumerate(path.read_text().splitlines(), 1)
             if asking.search(line)]
    assert found == []
