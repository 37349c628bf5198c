"""dataset and version erasure: when a dataset's object, or a version's artifacts, were erased

Revision ID: 0015
Revises: 0014
Create Date: 2026-11-27 10:00:00.000000

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa
import shared.db.types


# revision identifiers, used by Alembic.
revision: str = '0015'
down_revision: Union[str, Sequence[str], None] = '0014'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table('datasets', schema=None) as batch_op:
        batch_op.add_column(sa.Column('erased_at', shared.db.types.UTCDateTime(timezone=True), nullable=True))
    with op.batch_alter_table('model_versions', schema=None) as batch_op:
        batch_op.add_column(sa.Column('erased_at', shared.db.types.UTCDateTime(timezone=True), nullable=True))


def downgrade() -> None:
    """Downgrade schema: an erased version keeps its status "erased", which an older Kiln neither deploys nor
    rolls back to (only "validated" versions are); an erased dataset's row looks whole again, but its object is
    gone, so a run of it fails naming the missing object.

    A plain DROP COLUMN (SQLite 3.35 and newer have it): copying either table to a new one, as a batch alter does
    on SQLite, would drop the old table under the foreign keys of runs and deployments that name its rows."""
    with op.batch_alter_table('model_versions', schema=None, recreate='never') as batch_op:
        batch_op.drop_column('erased_at')
    with op.batch_alter_table('datasets', schema=None, recreate='never') as batch_op:
        batch_op.drop_column('erased_at')
