"""undeploy: a deployment without a version, and a pointer without one, say nothing serves the org

Revision ID: 0013
Revises: 0012
Create Date: 2026-11-26 18:00:00.000000

"""
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa

# revision identifiers, used by Alembic.
revision: str = '0013'
down_revision: Union[str, Sequence[str], None] = '0012'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

VERSION = sa.String(length=48)


@contextmanager
def _pointers_set_aside() -> Iterator[None]:
    """On SQLite a batch alter copies `deployments` to a new table and drops the old one, which the org pointers
    (current_deployments) refer to: with foreign keys on, the drop fails while a pointer names a deployment, and
    SQLite turns foreign keys off only outside a transaction. The pointers wait aside, in this same transaction,
    and come back once `deployments` holds every row again under its name."""
    bind = op.get_bind()
    if bind.dialect.name != 'sqlite':
        yield
        return
    pointers = sa.table(
        'current_deployments',
        sa.column('org_id'),
        sa.column('version'),
        sa.column('deployment_id'),
        sa.column('deployed_at'),
    )
    rows = [dict(row._mapping) for row in bind.execute(sa.select(pointers))]
    bind.execute(sa.delete(pointers))
    yield
    if rows:
        bind.execute(sa.insert(pointers), rows)


def upgrade() -> None:
    """Upgrade schema."""
    with _pointers_set_aside():
        with op.batch_alter_table('deployments') as batch_op:
            batch_op.alter_column('version', existing_type=VERSION, nullable=True)
        with op.batch_alter_table('current_deployments') as batch_op:
            batch_op.alter_column('version', existing_type=VERSION, nullable=True)


def downgrade() -> None:
    """Downgrade schema: the older schema cannot say "nothing serves" but by an org having no pointer, so an
    undeployed org loses its pointer (it stays undeployed), and the undeploys leave the history (their audit
    entries, model.undeployed, stay)."""
    op.execute('DELETE FROM current_deployments WHERE version IS NULL')
    op.execute('DELETE FROM deployments WHERE version IS NULL')
    with _pointers_set_aside():
        with op.batch_alter_table('current_deployments') as batch_op:
            batch_op.alter_column('version', existing_type=VERSION, nullable=False)
        with op.batch_alter_table('deployments') as batch_op:
            batch_op.alter_column('version', existing_type=VERSION, nullable=False)
