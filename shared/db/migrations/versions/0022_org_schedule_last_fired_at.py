"""org schedule_last_fired_at: a deleted schedule's last fire, so one set again never fires that time again

Revision ID: 0022
Revises: 0021
Create Date: 2026-11-28 12:00:00.000000

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa
import shared.db.types


# revision identifiers, used by Alembic.
revision: str = '0022'
down_revision: Union[str, Sequence[str], None] = '0021'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema. Plain ALTERs, not a batch: on SQLite a batch copies `organizations` to a new table, which
    the foreign keys of every org's rows refuse."""
    op.add_column(
        'organizations', sa.Column('schedule_last_fired_at', shared.db.types.UTCDateTime(timezone=True), nullable=True)
    )


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_column('organizations', 'schedule_last_fired_at')
