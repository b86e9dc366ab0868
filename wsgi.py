"""WSGI entry point for gunicorn run directly: `gunicorn -c config/gunicorn.conf.py wsgi:app`."""

from relay import create_app

app = create_app()
