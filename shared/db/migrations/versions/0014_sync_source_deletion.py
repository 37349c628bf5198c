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


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table('sync_sources', schema=None) as batch_op:
        batch_op.add_column(
            sa.Column('deletion_requested_at', shared.db.types.UTCDateTime(timezone=True), nullable=True)
        )
        batch_op.add_column(sa.Column('deletion_requested_by', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('deleted_at', shared.db.types.UTCDateTime(timezone=True), nullable=True))


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table('sync_sources', schema=None) as batch_op:
        batch_op.drop_column('deleted_at')
        batch_op.drop_column('deletion_requested_by')
        batch_op.drop_column('deletion_requested_at')
