"""one queued sync job per source: a partial unique index, after ending all but the oldest of any extra queued jobs;
and when a queued job's message was last queued again

Revision ID: 0021
Revises: 0020
Create Date: 2026-11-28 09:00:00.000000

"""
from datetime import UTC, datetime
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa

# revision identifiers, used by Alembic.
revision: str = '0021'
down_revision: Union[str, Sequence[str], None] = '0020'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

QUEUED = sa.text("status = 'queued'")
CANCELLED_BY_UPGRADE = (
    "cancelled by the upgrade to revision 0021: a job of the same source queued before it syncs all it would have"
)


def upgrade() -> None:
    """Upgrade schema. A source left with several queued jobs keeps its oldest, whose message comes first; the
    others end `cancelled`, saying why, and their messages, when they come, find them finished and run nothing."""
    now = datetime.now(UTC)
    op.get_bind().execute(
        sa.text(
            "UPDATE sync_jobs SET status = 'cancelled', finished_at = :now, errors = :errors "
            "WHERE status = 'queued' AND EXISTS ("
            "SELECT 1 FROM sync_jobs AS older WHERE older.source_id = sync_jobs.source_id AND older.status = 'queued' "
            "AND (older.created_at < sync_jobs.created_at "
            "OR (older.created_at = sync_jobs.created_at AND older.id < sync_jobs.id)))"
        ).bindparams(
            sa.bindparam("now", now, type_=sa.DateTime(timezone=True)),
            sa.bindparam("errors", [{"at": now.isoformat(), "error": CANCELLED_BY_UPGRADE}], type_=sa.JSON),
        ),
    )
    op.add_column('sync_jobs', sa.Column('requeued_at', sa.DateTime(timezone=True), nullable=True))
    op.create_index(
        'uq_sync_jobs_one_queued_per_source',
        'sync_jobs',
        ['source_id'],
        unique=True,
        postgresql_where=QUEUED,
        sqlite_where=QUEUED,
    )


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_index('uq_sync_jobs_one_queued_per_source', table_name='sync_jobs')
    with op.batch_alter_table('sync_jobs') as batch:
        batch.drop_column('requeued_at')
