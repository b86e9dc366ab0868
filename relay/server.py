"""`relay serve`: gunicorn with threaded workers, optionally running delivery in-process."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from typing import Any

from flask import Flask
from gunicorn.app.base import BaseApplication

DEFAULT_THREADS = 8
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


class RelayServer(BaseApplication):
    """Gunicorn embedded: each worker process builds its own app after the fork."""

    def __init__(self, options: dict[str, Any], with_worker: bool = False) -> None:
        self.options = options
        self.with_worker = with_worker
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            if key in self.cfg.settings and value is not None:
                self.cfg.set(key.lower(), value)

    # gunicorn's stubs type the WSGI environ as a MutableMapping, Flask as a dict.
    def load(self) -> Flask:  # type: ignore[override]
        from relay import create_app

        app = create_app()
        if self.with_worker:
            from relay.scheduler import start_in_process

            start_in_process(app)
        return app


def prepare_metrics_dir() -> str:
    """Put Prometheus in multiprocess mode for every gunicorn worker, so `/metrics` adds up all
    of them. Must run before prometheus_client is first imported (it decides at import time),
    hence before the fork. An operator's own PROMETHEUS_MULTIPROC_DIR is kept (it must be empty
    at start, e.g. a systemd RuntimeDirectory); otherwise a fresh one is removed at exit."""
    existing = os.environ.get(MULTIPROC_ENV)
    if existing:
        os.makedirs(existing, exist_ok=True)
        return existing
    path = tempfile.mkdtemp(prefix="relay-metrics-")
    os.environ[MULTIPROC_ENV] = path
    atexit.register(_remove_if_owner, path, os.getpid())
    return path


def _remove_if_owner(path: str, owner: int) -> None:
    """Gunicorn's workers inherit atexit handlers and exit through sys.exit: only the master,
    which created the directory, may remove it."""
    if os.getpid() == owner:
        shutil.rmtree(path, ignore_errors=True)


def child_exit(_server: Any, worker: Any) -> None:
    """Gunicorn hook: a dead worker's live gauges must not be reported any more."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]


def serve(host: str, port: int, workers: int, threads: int = DEFAULT_THREADS,
          with_worker: bool = False, extra: dict[str, Any] | None = None) -> None:
    prepare_metrics_dir()
    options = {
        "bind": f"{host}:{port}",
        "workers": workers,
        "worker_class": "gthread",
        "threads": threads,
        "timeout": 60,
        "graceful_timeout": 20,
        "keepalive": 5,
        "accesslog": None,
        "errorlog": "-",
        "loglevel": "info",
        "limit_request_field_size": 8190,
        "limit_request_fields": 100,
        "child_exit": child_exit,
        **(extra or {}),
    }
    RelayServer(options, with_worker=with_worker).run()
