"""sync source schedule_last_fired_at: a deleted schedule's last fire, so one set again never fires that time again

Revision ID: 0023
Revises: 0022
Create Date: 2026-11-28 13:00:00.000000

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa
import shared.db.types


# revision identifiers, used by Alembic.
revision: str = '0023'
down_revision: Union[str, Sequence[str], None] = '0022'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema. Plain ALTERs, not a batch: on SQLite a batch copies `sync_sources` to a new table, which
    the foreign keys of every source's rows refuse."""
    op.add_column(
        'sync_sources', sa.Column('schedule_last_fired_at', shared.db.types.UTCDateTime(timezone=True), nullable=True)
    )


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_column('sync_sources', 'schedule_last_fired_at')
