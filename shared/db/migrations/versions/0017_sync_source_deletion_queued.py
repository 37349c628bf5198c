"""sync source deletion queued: when a source's deletion task was last queued, so that the sync beat sends again one
whose message was lost

Revision ID: 0017
Revises: 0016
Create Date: 2026-11-27 10:00:00.000000

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa
import shared.db.types


# revision identifiers, used by Alembic.
revision: str = '0017'
down_revision: Union[str, Sequence[str], None] = '0016'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema. A deletion asked for and not done yet was queued when it was asked for (or later, asked
    again: that time is not kept, and the beat then sends it once more, which the worker ignores if it is done)."""
    with op.batch_alter_table('sync_sources', schema=None) as batch_op:
        batch_op.add_column(
            sa.Column('deletion_queued_at', shared.db.types.UTCDateTime(timezone=True), nullable=True)
        )
    sources = sa.table('sync_sources', sa.column('deletion_requested_at'), sa.column('deletion_queued_at'))
    op.execute(
        sources.update()
        .where(sources.c.deletion_requested_at.is_not(None))
        .values(deletion_queued_at=sources.c.deletion_requested_at)
    )


def downgrade() -> None:
    """Downgrade schema: an older Kiln leaves a deletion whose message was lost pending until it is asked again.

    A plain DROP COLUMN (SQLite 3.35 and newer have it): copying `sync_sources` to a new table, as a batch alter
    does on SQLite, would drop the old one under the foreign keys of the jobs (and schedules, watermarks...) that
    name its rows."""
    with op.batch_alter_table('sync_sources', schema=None, recreate='never') as batch_op:
        batch_op.drop_column('deletion_queued_at')
