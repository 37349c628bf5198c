"""outbox backoff: a message whose send failed waits before it is tried again, with the reason kept, so that one
that can never be sent stops holding back every message after it

Revision ID: 0018
Revises: 0017
Create Date: 2026-11-27 12:00:00.000000

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa
import shared.db.types


# revision identifiers, used by Alembic.
revision: str = '0018'
down_revision: Union[str, Sequence[str], None] = '0017'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema. Messages pending now have never failed as far as the table knows: they go on the next pass."""
    with op.batch_alter_table('outbox', schema=None, recreate='never') as batch_op:
        batch_op.add_column(sa.Column('failed_sends', sa.Integer(), nullable=False, server_default='0'))
        batch_op.add_column(
            sa.Column('next_send_at', shared.db.types.UTCDateTime(timezone=True), nullable=True)
        )
        batch_op.add_column(sa.Column('last_error', sa.Text(), nullable=True))


def downgrade() -> None:
    """Downgrade schema: an older Kiln tries every pending message on each pass again, in order."""
    with op.batch_alter_table('outbox', schema=None, recreate='never') as batch_op:
        batch_op.drop_column('last_error')
        batch_op.drop_column('next_send_at')
        batch_op.drop_column('failed_sends')
