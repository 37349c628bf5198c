"""sync source deletion: when a source's deletion was asked for, by whom, and when a sync worker did it

Revision ID: 0014
Revises: 0013
Create Date: 2026-11-26 10:00:00.000000

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa
import shared.db.types


# revision identifiers, used by Alembic.
revision: str = '0014'
down_revision: Union[str, Sequence[str], None] = '0013'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

# The tables whose rows name a source (a foreign key to sync_sources), at this revision.
SOURCE_REFERENCES = (
    'sync_jobs',
    'sync_watermarks',
    'sync_store_marks',
    'sync_resyncs',
    'sync_conflicts',
    'sync_schedules',
    'sync_bases',
)


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table('sync_sources', schema=None) as batch_op:
        batch_op.add_column(
            sa.Column('deletion_requested_at', shared.db.types.UTCDateTime(timezone=True), nullable=True)
        )
        batch_op.add_column(sa.Column('deletion_requested_by', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('deleted_at', shared.db.types.UTCDateTime(timezone=True), nullable=True))


def downgrade() -> None:
    """Downgrade schema. The older schema cannot tell a deleted source from a live one: a tombstone kept would be a
    live source again, and its next job would copy its tables up anew (sensitive columns as the mistaken
    registration said) beside the source registered again in its place. So a deleted source's row goes, with
    its jobs' history (all that still names it: the sync worker removed the rest; the audit trail keeps both).
    A source whose deletion was asked for but not done still has its central copies: dropping its row would leave
    them behind, and keeping it would sync again what its admin asked to delete. The downgrade is refused while
    one is left, naming them, and goes once sync workers have finished their deletions.

    A plain DROP COLUMN (SQLite 3.35 and newer have it): copying `sync_sources` to a new table, as a batch alter
    does on SQLite, would drop the old one under the foreign keys of the jobs (and schedules, watermarks...) that
    name its rows, and failed."""
    bind = op.get_bind()
    sources = sa.table(
        'sync_sources',
        sa.column('id'),
        sa.column('org_id'),
        sa.column('deletion_requested_at'),
        sa.column('deleted_at'),
    )
    pending = bind.execute(
        sa.select(sources.c.id, sources.c.org_id)
        .where(sources.c.deletion_requested_at.is_not(None), sources.c.deleted_at.is_(None))
        .order_by(sources.c.org_id, sources.c.id)
    ).all()
    if pending:
        raise RuntimeError(
            f"sync sources are being deleted: {', '.join(f'{row.id} of organization {row.org_id}' for row in pending)}."
            " The schema before revision 0014 would make them live sources again, syncing what their admins asked "
            "to delete: run a sync worker until GET /v1/orgs/{org}/sync-sources/{id} answers 404 for each, then "
            "downgrade"
        )
    deleted = sa.select(sources.c.id).where(sources.c.deleted_at.is_not(None))
    for name in SOURCE_REFERENCES:
        referring = sa.table(name, sa.column('source_id'))
        bind.execute(sa.delete(referring).where(referring.c.source_id.in_(deleted)))
    bind.execute(sa.delete(sources).where(sources.c.deleted_at.is_not(None)))
    with op.batch_alter_table('sync_sources', schema=None, recreate='never') as batch_op:
        batch_op.drop_column('deleted_at')
        batch_op.drop_column('deletion_requested_by')
        batch_op.drop_column('deletion_requested_at')
