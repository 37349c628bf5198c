"""training run message_queued_at: when its latest message was queued, so a sweep can queue one lost again

Revision ID: 0024
Revises: 0023
Create Date: 2026-11-28 10:00:00.000000

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa
import shared.db.types


# revision identifiers, used by Alembic.
revision: str = '0024'
down_revision: Union[str, Sequence[str], None] = '0023'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema. A plain ALTER, not a batch: on SQLite a batch copies `training_runs` to a new table, which
    the foreign keys of the runs' logs and candidates refuse. Runs queued before it read their created_at."""
    op.add_column(
        'training_runs', sa.Column('message_queued_at', shared.db.types.UTCDateTime(timezone=True), nullable=True)
    )


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_column('training_runs', 'message_queued_at')
