"""candidate folders: the folder of each version being uploaded and not registered yet, so that one whose attempt
died (or whose clean-up the store failed) is found and removed rather than left with the org's held-out rows

Revision ID: 0020
Revises: 0019
Create Date: 2026-11-27 17:00:00.000000

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa
import shared.db.types

# revision identifiers, used by Alembic.
revision: str = '0020'
down_revision: Union[str, Sequence[str], None] = '0019'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table('candidate_folders',
    sa.Column('prefix', sa.String(length=300), nullable=False),
    sa.Column('run_id', sa.String(length=40), nullable=False),
    sa.Column('org_id', sa.String(length=63), nullable=False),
    sa.Column('claim_token', sa.Integer(), nullable=False),
    sa.Column('holdout_on_premises', sa.Boolean(), nullable=False),
    sa.Column('created_at', shared.db.types.UTCDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['org_id'], ['organizations.id'], name=op.f('fk_candidate_folders_org_id_organizations')),
    sa.ForeignKeyConstraint(['run_id'], ['training_runs.id'], name=op.f('fk_candidate_folders_run_id_training_runs')),
    sa.PrimaryKeyConstraint('prefix', name=op.f('pk_candidate_folders'))
    )
    with op.batch_alter_table('candidate_folders', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_candidate_folders_run_id'), ['run_id'], unique=False)


def downgrade() -> None:
    """Downgrade schema: an older Kiln forgets the folders still to remove, and leaves them in the store."""
    with op.batch_alter_table('candidate_folders', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_candidate_folders_run_id'))
    op.drop_table('candidate_folders')
