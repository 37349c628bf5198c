"""One table of a sync source, open on both sides for one job: its two stores, its spec and the org's keyring,
and how a row looks on each side (sensitive columns sealed centrally, plain locally)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, Table
from sqlalchemy.orm import Session

from services.sync.changes import CENTRAL_LOG, shut_out_writers
from services.sync.column_types import Check, refuse_unstorable
from services.sync.envelope import Keyring, hold_active_key
from services.sync.merge import read_back
from services.sync.stores import META_COLUMNS
from shared.db.models import SyncSource
from shared.errors import KeptOnPremises
from shared.org_lock import org_config_held
from shared.sync_jobs import residency_refusal
from shared.sync_tables import SyncTable


@dataclass
class Tally:
    pushed: int = 0
    pulled: int = 0
    conflicts: int = 0


@dataclass
class TablePair:
    """One table of a source, open on both sides for one job."""

    spec: SyncTable
    org_id: str
    source_id: str
    job_id: str | None
    local: Engine
    central: Engine
    local_table: Table
    central_table: Table
    central_name: str
    keyring: Keyring
    offset_ms: int
    batch_size: int
    after_batch: Callable[[Tally], None] | None = None
    tally: Tally = field(default_factory=Tally)
    # A central deletion the local store refuses (a record of another table still points at the one deleted) is
    # put off on the job's first pass, whose other tables may delete what points at it; settled on the second.
    settle_refused_deletions: bool = False
    # What each column's central copy cannot hold (services/sync/column_types.py); none for a PostgreSQL store.
    checks: dict[str, Check] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return self.spec.primary_key

    def sealed(self, row: dict[str, Any]) -> dict[str, Any]:
        """A local row as the central store holds it: sensitive columns encrypted. InvalidInput for a value the
        central store cannot hold as it is."""
        refuse_unstorable(self.spec.name, self.key, row, self.checks)
        return {
            name: self.keyring.seal(value, column=self._column(name)) if name in self.spec.sensitive_columns else value
            for name, value in row.items()
        }

    def under_active_key(self, row: dict[str, Any]) -> dict[str, Any]:
        """A central row with any sensitive value still under an older key of the org sealed again under the
        keyring's active one (the row itself when none is). A batch that copies central values into bases, conflicts
        or the audit after reading them, while a rotation re-encrypts them, would otherwise write copies under a
        key the rotation then drains, having found that place done; hold_sealing_key at the write checks that this
        keyring's key is still the active one."""
        stale = [name for name in self.spec.sensitive_columns if name in row and not self.keyring.is_current(row[name])]
        if not stale:
            return row
        opened = {name: self.keyring.open(row[name], column=self._column(name)) for name in stale}
        return {**row, **{name: self.keyring.seal(value, column=self._column(name)) for name, value in opened.items()}}

    def plain(self, row: dict[str, Any]) -> dict[str, Any]:
        """A central row as the local store holds it: without the sync columns, sensitive columns decrypted."""
        opened = dict(row)
        for name in META_COLUMNS:
            opened.pop(name, None)
        for name in self.spec.sensitive_columns:
            if name in opened:
                opened[name] = self._opened(name, opened[name])
        return opened

    def plain_values(self, rows: list[list[Any]], names: list[str]) -> list[list[Any]]:
        """Central records' values in `names` order (columns of the local table), their sensitive columns opened in
        place: a pull's rows go to the local store in that shape, with no dict made per row on the way."""
        for name in self.spec.sensitive_columns:
            if name in names:
                index, column = names.index(name), self._column(name)
                for values in rows:
                    values[index] = self.keyring.open(values[index], column=column)
                    if isinstance(values[index], list):
                        values[index] = read_back(self.local_table.c[name].type, values[index])
        return rows

    def _opened(self, name: str, sealed: str | None) -> Any:
        """A sealed value opened as the local column holds it: a PostgreSQL array's items, sealed as JSON keeps
        them, read back as its item type."""
        value = self.keyring.open(sealed, column=self._column(name))
        return read_back(self.local_table.c[name].type, value) if isinstance(value, list) else value

    def _column(self, name: str) -> str:
        return f"{self.spec.name}.{name}"


def hold_sealing_key(session: Session, pair: TablePair) -> None:
    """Before a transaction writes sealed values centrally: its key stays active until the commit, or KeyRotated
    (services/sync/envelope.py). A table without sensitive columns seals nothing."""
    if not pair.spec.sensitive_columns:
        return
    if session.connection().dialect.name == "sqlite":
        # No row locks: the database's one write lock, taken before the check, keeps a rotation out instead.
        shut_out_writers(session.connection(), CENTRAL_LOG)
    hold_active_key(session, pair.keyring)


def hold_residency(session: Session, pair: TablePair) -> None:
    """First in a transaction that sends local records up: KeptOnPremises if the org keeps its data local now, and
    its residency stays so until the commit (a PATCH switching it waits). A job checks residency as it starts; an
    org switched while it runs sends nothing more up from the switch on. Taken before the central log's lock and
    the sealing key's: the api takes the org's lock first in its transactions, never after those."""
    refusal = residency_refusal(org_config_held(session, pair.org_id), session.get_one(SyncSource, pair.source_id))
    if refusal is not None:
        raise KeptOnPremises(refusal)
