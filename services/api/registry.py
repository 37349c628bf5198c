"""The model registry's rules: what may be deployed, what a rollback returns to, and the pointer + event write."""

from __future__ import annotations

from sqlalchemy import ColumnElement, func, or_, select, update
from sqlalchemy.orm import Session

from shared.db.models import (
    ACTION_UNDEPLOY,
    DEPLOYMENT_FAILED,
    DEPLOYMENT_SUPERSEDED,
    DEPLOYMENT_UNDEPLOYED,
    CurrentDeployment,
    Deployment,
    ModelVersion,
    OutboxMessage,
)
from shared.deployments import serving_deployment
from shared.errors import Conflict, NotFound
from shared.lookups import get_owned
from shared.org_lock import lock_org
from shared.outbox import KIND_DEPLOY_EVENT, add_message
from shared.verdicts import ERASED, VALIDATED, locked_version, rejected_gates

DEPLOYABLE = VALIDATED


def deployable_version(session: Session, *, org_id: str, version: str) -> ModelVersion:
    """The org's version, if it passed every gate; a rejected one is refused with the gates it was rejected for (a
    rejection is final: a later judgement that passes, under relaxed gates say, does not make it deployable).

    Judged under the org's lock and the version's, which the deploy holds until its commit: a judgement that rejects
    the version (which takes the version's lock) lands either before, and the deploy is refused, or after it, and
    the version deployed is then one judged again since, which keeps serving as any deployed version does."""
    get_owned(session, ModelVersion, version, org_id=org_id, field="version")
    lock_org(session, org_id)
    row = locked_version(session, version)
    refuse_erased(row, "deployed or rolled back to", field="version")
    if row.status != DEPLOYABLE:
        failed = failed_gates(row)
        raise Conflict(
            f"version {version} was rejected by validation (failed gates: {', '.join(failed) or 'unknown'}) "
            "and can never be deployed",
            field="version",
            detail={"failedGates": failed},
        )
    return row


def refuse_erased(row: ModelVersion, never: str, *, field: str | None = None) -> None:
    """A 409 for an erased version: its artifacts are gone, for good."""
    if row.status == ERASED:
        erased_at = row.erased_at.isoformat() if row.erased_at is not None else "an earlier time"
        raise Conflict(
            f"version {row.version} was erased at {erased_at} (its artifacts are gone): it can never be {never}",
            field=field,
            detail={"erasedAt": erased_at},
        )


def refuse_in_service(session: Session, *, org_id: str, version: str) -> None:
    """A 409 while predictors serve `version`, or may: the org's deployed version (the pointer's, even while its
    deployment is refused), the version serving in its place meanwhile, and the one that serves until a new
    deployment has loaded on a predictor. Call it holding the org's lock (lock_org)."""
    current = session.get(CurrentDeployment, org_id, populate_existing=True)
    if current is None:
        return
    serving = serving_deployment(session, org_id)
    if version in (current.version, serving.version if serving is not None else None):
        raise Conflict(
            f"version {version} is deployed for organization {org_id}: deploy another version or undeploy "
            f"(DELETE /v1/orgs/{org_id}/deployment) first"
        )
    pointer = session.get_one(Deployment, current.deployment_id)
    if pointer.version is None or pointer.status == DEPLOYMENT_FAILED or pointer.loaded_at is not None:
        return
    if _serving_until_loaded(session, pointer) == version:
        raise Conflict(
            f"version {version} still serves organization {org_id} until deployment {pointer.id} of version "
            f"{pointer.version} has loaded on a predictor (and again if a predictor refuses it): try again once it "
            f"has, or undeploy (DELETE /v1/orgs/{org_id}/deployment) first"
        )


def _serving_until_loaded(session: Session, pointer: Deployment) -> str | None:
    """The version predictors serve until `pointer` has loaded: the newest one before it that loaded, however
    many deployments since have not (an undeploy since: none). With no load on record, the one just before it."""
    earlier = select(Deployment).where(
        Deployment.org_id == pointer.org_id, Deployment.id < pointer.id, Deployment.status != DEPLOYMENT_FAILED
    )
    newest_first = earlier.order_by(Deployment.id.desc()).limit(1)
    settled = session.scalar(newest_first.where(or_(Deployment.loaded_at.is_not(None), Deployment.version.is_(None))))
    before = settled if settled is not None else session.scalar(newest_first)
    return before.version if before is not None else None


def failed_gates(row: ModelVersion) -> list[str]:
    """The gates that rejected the version; none for a validated one."""
    return [] if row.status == DEPLOYABLE else rejected_gates(row.validation)


def current_deployment(session: Session, *, org_id: str) -> CurrentDeployment:
    current = session.get(CurrentDeployment, org_id)
    if current is None:
        raise NotFound(f"organization {org_id!r} has no deployed version")
    return current


def rollback_default(session: Session, current: CurrentDeployment) -> str | None:
    """Where `rollback {}` goes, if it may: while a version is deployed, the newest validated version older than
    it; while the org is undeployed, the version that served until the undeploy, if it is validated still."""
    if current.version is not None:
        return earlier_deployable(session, org_id=current.org_id, version=current.version)
    undeployed = session.get_one(Deployment, current.deployment_id).previous_version
    if undeployed is None:
        return None
    return session.scalar(
        select(ModelVersion.version).where(ModelVersion.version == undeployed, ModelVersion.status == DEPLOYABLE)
    )


def earlier_deployable(session: Session, *, org_id: str, version: str) -> str | None:
    """The newest validated version created before `version`: where a rollback without a version goes."""
    reference = session.get(ModelVersion, version)
    if reference is None:
        return None
    return session.scalar(
        select(ModelVersion.version)
        .where(
            ModelVersion.org_id == org_id,
            ModelVersion.status == DEPLOYABLE,
            ModelVersion.created_at <= reference.created_at,
            ModelVersion.version != version,
        )
        .order_by(ModelVersion.created_at.desc(), ModelVersion.version.desc())
        .limit(1)
    )


def record_deployment(
    session: Session, *, org_id: str, version: str, action: str, actor: str
) -> tuple[CurrentDeployment, OutboxMessage | None]:
    """Point the org at `version`, keep the history row, and write the deploy event to the outbox.

    Deploying the version already deployed changes nothing and sends nothing, unless its deployment failed: then it
    is a new attempt, which the predictors try afresh (the cause, a store down say, may have passed).
    """
    # The api's deploy and rollback chose the version under this lock already (taking it again changes nothing);
    # a caller that did not takes it here.
    lock_org(session, org_id)
    # The version was read before the lock: an erasure may have committed since.
    refuse_erased(session.get_one(ModelVersion, version, populate_existing=True), "deployed or rolled back to")
    # populate_existing: a rollback read the pointer before it held the lock, and that copy may be stale now.
    current = session.get(CurrentDeployment, org_id, populate_existing=True)
    if current is not None and current.version == version and not _failed(session, current.deployment_id):
        return current, None
    history = Deployment(
        org_id=org_id,
        version=version,
        previous_version=current.version if current is not None else None,
        action=action,
        actor=actor,
    )
    session.add(history)
    session.flush()
    if current is None:
        current = CurrentDeployment(
            org_id=org_id, version=version, deployment_id=history.id, deployed_at=history.created_at
        )
        session.add(current)
    else:
        current.version, current.deployment_id, current.deployed_at = version, history.id, history.created_at
    return current, deploy_event(session, current)


def record_undeployment(session: Session, *, org_id: str, actor: str) -> tuple[str, OutboxMessage] | None:
    """Point the org at nothing: a history row without a version, from the version it stops, and the event that has
    the predictors drop the org's model. Returns the version undeployed (where `rollback {}` then goes) and the event.

    When nothing serves (the org never deployed, or was undeployed and has deployed nothing since that served), it
    changes nothing, sends nothing and returns None. "Serving" is the predictors' rule: a deployment that was
    refused never served, so an undeploy while one is refused stops the org's last good one, and names it.

    A deployment no predictor has loaded yet may be broken and about to be refused: until one has, what serves is
    the org's last deployment that did load. So the undeploy names the newest deployment since the org's last
    undeploy that a predictor has loaded and that was not refused, and settles the deployments after it, never
    loaded, as superseded (they will not be tried now). When none has loaded, it names the deployment it stops.
    """
    lock_org(session, org_id)
    current = session.get(CurrentDeployment, org_id, populate_existing=True)
    if current is None:
        return None
    since = _last_undeploy(session, org_id)
    # Hold the deployments not loaded yet, as a predictor's first load or refusal of them would write: what it wrote
    # before is read below, and what it writes after lands on a deployment settled already.
    session.execute(
        select(Deployment.id)
        .where(*_since(org_id, since), Deployment.loaded_at.is_(None), Deployment.status != DEPLOYMENT_FAILED)
        .order_by(Deployment.id)
        .with_for_update(key_share=True)
    )
    serving = serving_deployment(session, org_id)
    if serving is None or serving.version is None:
        return None
    loaded = session.scalar(
        select(Deployment)
        .where(
            *_since(org_id, since),
            Deployment.id <= serving.id,
            Deployment.status != DEPLOYMENT_FAILED,
            Deployment.loaded_at.is_not(None),
        )
        .order_by(Deployment.id.desc())
        .limit(1)
    )
    stopped = loaded or serving
    history = Deployment(
        org_id=org_id,
        version=None,
        previous_version=stopped.version,
        action=ACTION_UNDEPLOY,
        actor=actor,
        status=DEPLOYMENT_UNDEPLOYED,
    )
    session.add(history)
    session.flush()
    session.execute(
        update(Deployment)
        .where(
            *_since(org_id, stopped.id),
            Deployment.id < history.id,
            Deployment.loaded_at.is_(None),
            Deployment.status != DEPLOYMENT_FAILED,
        )
        .values(
            status=DEPLOYMENT_SUPERSEDED,
            error=f"undeployed (deployment {history.id}) before any predictor had loaded it",
        )
        .execution_options(synchronize_session=False)
    )
    current.version, current.deployment_id, current.deployed_at = None, history.id, history.created_at
    assert stopped.version is not None  # only an undeploy has none, and none comes after the last one
    return stopped.version, deploy_event(session, current)


def _last_undeploy(session: Session, org_id: str) -> int:
    """The id of the org's last undeploy (0 for none): nothing deployed before it ever serves again."""
    last = session.scalar(
        select(func.max(Deployment.id)).where(Deployment.org_id == org_id, Deployment.action == ACTION_UNDEPLOY)
    )
    return last or 0


def _since(org_id: str, after: int) -> tuple[ColumnElement[bool], ColumnElement[bool]]:
    return Deployment.org_id == org_id, Deployment.id > after


def deploy_event(session: Session, current: CurrentDeployment) -> OutboxMessage:
    """The outbox message that sends predictors to re-read the org's deployment: its version and serving policy."""
    payload = {"org_id": current.org_id, "version": current.version, "deployment_id": current.deployment_id}
    return add_message(session, kind=KIND_DEPLOY_EVENT, payload=payload)


def _failed(session: Session, deployment_id: int) -> bool:
    return session.get_one(Deployment, deployment_id).status == DEPLOYMENT_FAILED


def rollback_target(session: Session, *, org_id: str, requested: str | None) -> str:
    """Where a rollback goes: the version named, or `rollback_default`'s. Chosen under the org's lock, and the
    target's, held until the rollback commits, so that a judgement rejecting the target lands before (then the
    target is refused by name, or `rollback {}` goes to the next validated version) or after the rollback."""
    lock_org(session, org_id)
    current = session.get(CurrentDeployment, org_id, populate_existing=True)
    if current is None:
        raise NotFound(f"organization {org_id!r} has no deployed version")
    if requested is not None:
        if requested == current.version:
            raise Conflict(f"version {requested} is already deployed", field="version")
        return deployable_version(session, org_id=org_id, version=requested).version
    while (target := rollback_default(session, current)) is not None:
        if locked_version(session, target).status == DEPLOYABLE:
            return target
        # Rejected after the query read it validated and before the lock: rejected for good, so it is not found
        # again, and the next query picks the next target.
    if current.version is not None:
        raise Conflict(f"no validated version older than {current.version} to roll back to")
    undeployed = session.get_one(Deployment, current.deployment_id).previous_version
    since = "erased" if undeployed is not None and _status(session, undeployed) == ERASED else "rejected by validation"
    raise Conflict(
        f"the org was undeployed, and version {undeployed}, which served until then, was {since} since: deploy a "
        "validated version, or roll back to one by name"
    )


def _status(session: Session, version: str) -> str | None:
    return session.scalar(select(ModelVersion.status).where(ModelVersion.version == version))
