"""The migrations, one file per revision (Alembic reads them; nothing imports them)."""
