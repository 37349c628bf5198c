"""sync store marks: knowing a local store restored from a backup

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-27 09:00:00.000000

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa
import shared.db.types

# revision identifiers, used by Alembic.
revision: str = '0009'
down_revision: Union[str, Sequence[str], None] = '0008'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table('sync_store_marks',
    sa.Column('source_id', sa.String(length=40), nullable=False),
    sa.Column('token', sa.String(length=64), nullable=False),
    sa.Column('previous_token', sa.String(length=64), nullable=True),
    sa.Column('updated_at', shared.db.types.UTCDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['source_id'], ['sync_sources.id'], name=op.f('fk_sync_store_marks_source_id_sync_sources')),
    sa.PrimaryKeyConstraint('source_id', name=op.f('pk_sync_store_marks'))
    )
    # Watermarks kept before have no fingerprint: a job takes it from the store the first time (accepted once).
    op.add_column('sync_watermarks', sa.Column('logged_key', sa.Text(), nullable=True))
    op.add_column('sync_watermarks', sa.Column('logged_at_ms', sa.BigInteger(), nullable=True))


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table('sync_watermarks') as batch_op:
        batch_op.drop_column('logged_at_ms')
        batch_op.drop_column('logged_key')
    op.drop_table('sync_store_marks')
