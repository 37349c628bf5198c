"""`kiln secrets status` and `kiln secrets rewrap`: which platform key each stored secret and backup is sealed under,
and moving them all under KILN_SECRET_KEY once it was rotated, so that a retired key can be removed."""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Iterator

from sqlalchemy import select

from services.sync.backup import BackupManifest, list_backups, rewrap_backup
from services.sync.context import SyncContext
from shared.audit import record_change
from shared.crypto import SecretBox
from shared.db.models import Organization
from shared.db.session import session_scope
from shared.errors import KilnError
from shared.schemas import OrgConfig
from shared.storage import ObjectStore, backup_stores, on_premises
from shared.stored_secrets import OLD_FORMAT, Rewrapped, count_by_key, rewrap_stored_secrets

BACKUPS = "backups"
BACKUP_REWRAPPED_ACTION = "backup.rewrapped"
# `kiln secrets status`'s exit codes, so that a script can gate a retired key's removal on it (1 is an error and 2
# a command misused, as for every `kiln` command).
ALL_UNDER_CURRENT_KEY = 0
LEFT_TO_REWRAP = 3  # under a retired key or in the old format: `kiln secrets rewrap` moves them
UNDER_A_KEY_NOT_CONFIGURED = 4  # they do not open, or a damaged manifest hides their key: a rewrap cannot move them
# Counted in place of a key for a backup whose manifest does not read: it may be under any key, retired ones too.
DAMAGED = "damaged manifest"


def print_status(context: SyncContext) -> int:
    """Print which key each kind of stored secret and backup is under; exit ALL_UNDER_CURRENT_KEY only when every one
    counted is under KILN_SECRET_KEY, so that a retired key may go."""
    box = context.secrets
    counts = count_by_key(context.sessions)
    counts[BACKUPS], damaged, elsewhere = _backups_by_key(context)
    retired = ", ".join(box.retired_ids) or "none"
    print(f"KILN_SECRET_KEY {box.current_id} (current); KILN_SECRET_KEY_RETIRED: {retired}")
    for kind, by_key in counts.items():
        shown = ", ".join(f"{count} under {_label(box, key)}" for key, count in sorted(by_key.items())) or "none"
        print(f"{kind}: {shown}")
    total = sum(counts.values(), Counter[str]())
    for key in box.retired_ids:
        print(f"retired key {key}: {_left_under(key, total)}")
    if total[OLD_FORMAT]:
        print(f"{total[OLD_FORMAT]} in the old format name no key: keep every retired key until a rewrap moved them")
    if total[DAMAGED]:
        print(
            f"{total[DAMAGED]} under a damaged manifest name no key: keep every retired key until each is mended "
            "or removed"
        )
    for problem in damaged:
        print(f"kiln secrets: {problem}", file=sys.stderr)
    if elsewhere:
        print(
            f"not counted here: the backups of {', '.join(elsewhere)}, kept on their premises (dataResidency local): "
            "run `kiln secrets status` there"
        )
    return _status_code(box, total)


def rewrap(context: SyncContext, *, actor: str) -> int:
    """Move every stored secret and backup under the current key; 1 if any could not be opened, or a backup's
    manifest is damaged (its key unknown, it may be under a retired one)."""
    done = rewrap_stored_secrets(context.sessions, context.secrets, actor=actor)
    done[BACKUPS] = _rewrap_backups(context, actor=actor)
    current = context.secrets.current_id
    for kind, rewrapped in done.items():
        print(f"{kind}: {rewrapped.moved} moved under {current}, {rewrapped.current} under it already")
        for reason in rewrapped.unreadable:
            print(f"kiln secrets: {reason}", file=sys.stderr)
    return 1 if any(rewrapped.unreadable for rewrapped in done.values()) else 0


def _left_under(key: str, total: Counter[str]) -> str:
    if total[key]:
        return f"{total[key]} still under it: `kiln secrets rewrap` moves them"
    if total[DAMAGED]:  # those may be under it
        return "nothing counted under it"
    return "nothing under it"


def _status_code(box: SecretBox, total: Counter[str]) -> int:
    held = {key for key, count in total.items() if count}
    if held - {box.current_id, *box.retired_ids, OLD_FORMAT}:  # DAMAGED among them
        return UNDER_A_KEY_NOT_CONFIGURED
    if held - {box.current_id}:
        return LEFT_TO_REWRAP
    return ALL_UNDER_CURRENT_KEY


def _label(box: SecretBox, key: str) -> str:
    if key == box.current_id:
        return f"{key} (current)"
    if key in box.retired_ids:
        return f"{key} (retired)"
    if key == OLD_FORMAT:
        return "the old format (no key named)"
    if key == DAMAGED:
        return "a key unknown (their manifest is damaged)"
    return f"{key} (not configured: they do not open)"


def _backups_by_key(context: SyncContext) -> tuple[Counter[str], list[str], list[str]]:
    """How many backups each key id (or OLD_FORMAT, or DAMAGED) holds, read from their manifests; why each damaged
    manifest does not read; and the orgs whose backups are on premises other than this machine."""
    by_key: Counter[str] = Counter()
    damaged: list[str] = []
    elsewhere = []
    for org_id, store in _backup_stores(context):
        if store is None:
            elsewhere.append(org_id)
            continue
        listed = list_backups(store, org_id)
        by_key.update(manifest.sealed_under or OLD_FORMAT for manifest in listed.manifests)
        by_key.update(DAMAGED for _ in listed.damaged)
        damaged.extend(listed.damaged)
    return by_key, damaged, elsewhere


def _rewrap_backups(context: SyncContext, *, actor: str) -> Rewrapped:
    done = Rewrapped()
    for org_id, store in _backup_stores(context):
        if store is None:  # on its premises, where a rewrap run there re-seals them
            continue
        listed = list_backups(store, org_id)
        done.unreadable.extend(listed.damaged)  # its key unknown: it may hold a retired key back
        for manifest in listed.manifests:
            if manifest.sealed_under == context.secrets.current_id:
                done.current += 1
                continue
            try:
                rewrap_backup(store, context.secrets, manifest)
            except KilnError as error:
                done.unreadable.append(error.message)
                continue
            _audit_backup(context, manifest, actor=actor)
            done.moved += 1
    return done


def _audit_backup(context: SyncContext, manifest: BackupManifest, *, actor: str) -> None:
    detail = {"from": manifest.sealed_under or OLD_FORMAT, "to": context.secrets.current_id}
    with session_scope(context.sessions) as session:
        record_change(
            session,
            org_id=manifest.org_id,
            actor=actor,
            action=BACKUP_REWRAPPED_ACTION,
            target=manifest.backup_id,
            detail=detail,
        )


def _backup_stores(context: SyncContext) -> Iterator[tuple[str, ObjectStore | None]]:
    """Each org and each store this machine sees that may hold its backups (shared/storage.py, backup_stores), those
    taken before its dataResidency changed among them; and None for an org keeping its data on its premises when
    this machine holds no premises folder (`kiln backup` keeps such an org's backups on the machine that ran it)."""
    stores, premises_here = backup_stores(context.settings, central=context.store), on_premises(context.settings)
    with session_scope(context.sessions) as session:
        orgs = session.execute(select(Organization.id, Organization.config).order_by(Organization.id)).all()
    for org_id, config in orgs:
        for store in stores:
            yield org_id, store
        if OrgConfig.model_validate(config).data_residency == "local" and not premises_here:
            yield org_id, None
