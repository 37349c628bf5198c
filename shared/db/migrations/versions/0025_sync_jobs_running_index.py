"""sync jobs running index: the sync beat looks for running jobs whose worker died every tick

Revision ID: 0025
Revises: 0024
Create Date: 2026-11-28 12:30:00.000000

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = '0025'
down_revision: Union[str, Sequence[str], None] = '0024'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

RUNNING = sa.text("status = 'running'")


def upgrade() -> None:
    """Upgrade schema."""
    op.create_index(
        'ix_sync_jobs_running', 'sync_jobs', ['source_id'], postgresql_where=RUNNING, sqlite_where=RUNNING
    )


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_index('ix_sync_jobs_running', table_name='sync_jobs')
