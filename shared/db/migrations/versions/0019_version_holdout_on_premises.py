"""version holdout on premises: where a version's held-out rows were written (the org's premises folder or the
central store), recorded when the version is registered, so that erasing it follows the rows and not the org's
config of the day

Revision ID: 0019
Revises: 0018
Create Date: 2026-11-27 12:00:00.000000

"""
from typing import Any, Sequence, Union

from alembic import op
import sqlalchemy as sa
import shared.db.types


# revision identifiers, used by Alembic.
revision: str = '0019'
down_revision: Union[str, Sequence[str], None] = '0018'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema. Nothing recorded where an existing version's rows went, so they are guessed from the org:
    every version of an org that keeps its data on its premises now, or ever did by its audit trail (created or
    changed with dataResidency "local"), is taken to have its rows there. Guessing "premises" wrongly costs a
    premises erasure that finds nothing (the api removes the central copy either way); guessing "central" wrongly
    would leave rows on the premises with nothing queued to remove them."""
    with op.batch_alter_table('model_versions', schema=None, recreate='never') as batch_op:
        batch_op.add_column(sa.Column('holdout_on_premises', sa.Boolean(), nullable=False, server_default=sa.false()))
    orgs = _orgs_ever_local(op.get_bind())
    if orgs:
        versions = sa.table('model_versions', sa.column('org_id', sa.String), sa.column('holdout_on_premises'))
        op.execute(versions.update().where(versions.c.org_id.in_(sorted(orgs))).values(holdout_on_premises=True))


def _orgs_ever_local(connection: sa.Connection) -> set[str]:
    json = shared.db.types.JsonType
    organizations = sa.table('organizations', sa.column('id', sa.String), sa.column('config', json))
    audit = sa.table('audit_log', sa.column('org_id', sa.String), sa.column('action', sa.String), sa.column('detail', json))
    now = {org_id for org_id, config in connection.execute(sa.select(organizations.c.id, organizations.c.config))
           if _local(config)}
    changes = connection.execute(
        sa.select(audit.c.org_id, audit.c.detail).where(audit.c.action.in_(['org.created', 'org.updated']))
    )
    return now | {org_id for org_id, detail in changes if isinstance(detail, dict) and _local(detail.get('config'))}


def _local(config: Any) -> bool:
    return isinstance(config, dict) and config.get('dataResidency') == 'local'


def downgrade() -> None:
    """Downgrade schema: an older Kiln locates a version's held-out rows by the org's config at erasure time again.

    A plain DROP COLUMN (SQLite 3.35 and newer have it): copying `model_versions` to a new table, as a batch alter
    does on SQLite, would drop the old one under the foreign keys of the deployments that name its rows."""
    with op.batch_alter_table('model_versions', schema=None, recreate='never') as batch_op:
        batch_op.drop_column('holdout_on_premises')
