"""sync resyncs: tables to bring back together with their restored local store at the next job

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-27 09:30:00.000000

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa
import shared.db.types

# revision identifiers, used by Alembic.
revision: str = '0010'
down_revision: Union[str, Sequence[str], None] = '0009'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table('sync_resyncs',
    sa.Column('source_id', sa.String(length=40), nullable=False),
    sa.Column('table_name', sa.String(length=64), nullable=False),
    sa.Column('requested_at', shared.db.types.UTCDateTime(timezone=True), nullable=False),
    sa.Column('requested_by', sa.String(length=64), nullable=False),
    sa.ForeignKeyConstraint(['source_id'], ['sync_sources.id'], name=op.f('fk_sync_resyncs_source_id_sync_sources')),
    sa.PrimaryKeyConstraint('source_id', 'table_name', name=op.f('pk_sync_resyncs'))
    )


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_table('sync_resyncs')
