"""sync source url change: when a source's URL was last changed, until a sync worker finds the source's own store there

Revision ID: 0016
Revises: 0015
Create Date: 2026-11-26 10:00:00.000000

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa
import shared.db.types


# revision identifiers, used by Alembic.
revision: str = '0016'
down_revision: Union[str, Sequence[str], None] = '0015'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table('sync_sources', schema=None) as batch_op:
        batch_op.add_column(sa.Column('url_changed_at', shared.db.types.UTCDateTime(timezone=True), nullable=True))


def downgrade() -> None:
    """Downgrade schema: an older Kiln does not check a changed URL's store, and takes a store that holds no mark of
    the source for one restored from a backup (which a resync lets through).

    A plain DROP COLUMN (SQLite 3.35 and newer have it): copying `sync_sources` to a new table, as a batch alter
    does on SQLite, would drop the old one under the foreign keys of the jobs (and schedules, watermarks...) that
    name its rows."""
    with op.batch_alter_table('sync_sources', schema=None, recreate='never') as batch_op:
        batch_op.drop_column('url_changed_at')
