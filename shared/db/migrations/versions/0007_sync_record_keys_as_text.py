"""sync record keys as text: a text primary key may be longer than 200 characters (the audit names it too)

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-26 10:50:00.000000

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa

# revision identifiers, used by Alembic.
revision: str = '0007'
down_revision: Union[str, Sequence[str], None] = '0006'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

KEY_COLUMNS = (
    ("sync_changes", "pk", 200),
    ("sync_conflicts", "record_key", 200),
    ("sync_bases", "record_key", 200),
    ("audit_log", "target", 300),
)


def upgrade() -> None:
    """Upgrade schema."""
    for table, column, length in KEY_COLUMNS:
        with op.batch_alter_table(table) as batch_op:
            batch_op.alter_column(column, type_=sa.Text(), existing_type=sa.String(length=length), existing_nullable=False)


def downgrade() -> None:
    """Downgrade schema."""
    for table, column, length in KEY_COLUMNS:
        with op.batch_alter_table(table) as batch_op:
            batch_op.alter_column(column, type_=sa.String(length=length), existing_type=sa.Text(), existing_nullable=False)
