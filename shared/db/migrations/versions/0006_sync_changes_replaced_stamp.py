"""sync_changes.replaced: the stamp a centrally edited record carried before the edit

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-26 03:05:00.000000

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa

# revision identifiers, used by Alembic.
revision: str = '0006'
down_revision: Union[str, Sequence[str], None] = '0005'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    op.add_column('sync_changes', sa.Column('replaced', sa.String(length=40), nullable=True))


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table('sync_changes') as batch_op:
        batch_op.drop_column('replaced')
