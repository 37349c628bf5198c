"""prediction risk level optional: a multiclass model without a normal class has no risk level to record

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-26 15:00:00.000000

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa

# revision identifiers, used by Alembic.
revision: str = '0011'
down_revision: Union[str, Sequence[str], None] = '0010'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table('predictions') as batch_op:
        batch_op.alter_column('risk_level', existing_type=sa.String(length=16), nullable=True)


def downgrade() -> None:
    """Downgrade schema: records without a risk level get an empty one, as the column then needs one."""
    op.execute("UPDATE predictions SET risk_level = '' WHERE risk_level IS NULL")
    with op.batch_alter_table('predictions') as batch_op:
        batch_op.alter_column('risk_level', existing_type=sa.String(length=16), nullable=False)
