"""Alembic scripts, shipped inside the package; `relay.migrate` runs them."""
