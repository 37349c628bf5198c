"""one active sync key per org: a partial unique index, after retiring all but the newest of any extra active keys

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-26 17:20:00.000000

"""
from datetime import UTC, datetime
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa

# revision identifiers, used by Alembic.
revision: str = '0012'
down_revision: Union[str, Sequence[str], None] = '0011'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

ACTIVE = sa.text("status = 'active'")


def upgrade() -> None:
    """Upgrade schema. An org left with two active keys keeps its newest active; the others are retired, so they
    still open what they sealed and the next rotation re-encrypts it."""
    op.get_bind().execute(
        sa.text(
            "UPDATE sync_keys SET status = 'retired', retired_at = :now WHERE status = 'active' AND EXISTS ("
            "SELECT 1 FROM sync_keys AS newer WHERE newer.org_id = sync_keys.org_id AND newer.status = 'active' "
            "AND (newer.created_at > sync_keys.created_at "
            "OR (newer.created_at = sync_keys.created_at AND newer.id > sync_keys.id)))"
        ).bindparams(sa.bindparam("now", datetime.now(UTC), type_=sa.DateTime(timezone=True))),
    )
    op.create_index(
        'uq_sync_keys_one_active_per_org',
        'sync_keys',
        ['org_id'],
        unique=True,
        postgresql_where=ACTIVE,
        sqlite_where=ACTIVE,
    )


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_index('uq_sync_keys_one_active_per_org', table_name='sync_keys')
