"""refused webhook requests: the body's SHA-256 instead of the body, and a count per address and
minute beyond which they are no longer logged one by one

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28 09:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_STATUSES = ("400", "401", "404", "413", "503")


def upgrade() -> None:
    with op.batch_alter_table("inbound_requests", schema=None) as batch_op:
        batch_op.add_column(sa.Column("body_sha256", sa.String(length=64), nullable=True))
    op.create_table(
        "refused_request_counts",
        sa.Column("minute", sa.DateTime(), nullable=False),
        sa.Column("remote_addr", sa.String(length=64), nullable=False),
        sa.Column("refused", sa.Integer(), nullable=False),
        sa.Column("logged", sa.Integer(), nullable=False),
        *(sa.Column(f"status_{status}", sa.Integer(), nullable=False) for status in _STATUSES),
        sa.PrimaryKeyConstraint("minute", "remote_addr"),
    )


def downgrade() -> None:
    op.drop_table("refused_request_counts")
    with op.batch_alter_table("inbound_requests", schema=None) as batch_op:
        batch_op.drop_column("body_sha256")
