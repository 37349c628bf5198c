"""Request dependencies: resources from app.state, one database session per request, and who is calling."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Header, Request, params
from fastapi.routing import APIRoute
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from services.api.resources import Resources
from shared.db.models import Organization
from shared.errors import Forbidden, InvalidKey, NotFound
from shared.json_keys import dotted, keys_within, refuse_repeated_keys
from shared.keys import ROLES, Principal, bearer_token, find_principal


async def refuse_repeated_json_keys(request: Request) -> None:
    """A JSON body with a key given twice in one object (`{"role": "viewer", "role": "admin"}`), which the parser
    would read as its last: refused naming the key's field. Only a body FastAPI has parsed as JSON already, so its
    text and its parse are both at hand and nothing more is read (an upload's route parses no JSON). Checked before
    the key, as the NUL in a URL is; in a worker thread, since a body whose strings hold colons is parsed again,
    ~160 ms for 1 MB, which on the event loop would hold every other request."""
    if not _parsed_as_json(request):
        return
    body = await request.body()
    if body:
        keys = keys_within([await request.json()])
        await run_in_threadpool(refuse_repeated_keys, body, keys, field_of=dotted)


def _parsed_as_json(request: Request) -> bool:
    """Whether FastAPI read this request's body as JSON: a route taking one (not a form), sent as JSON."""
    route = request.scope.get("route")
    body_field = route.body_field if isinstance(route, APIRoute) else None
    if body_field is None or isinstance(body_field.field_info, params.Form):
        return False
    sent = request.headers.get("content-type", "").split(";")[0].strip().lower()
    return sent.startswith("application/") and (sent == "application/json" or sent.endswith("+json"))


def get_resources(request: Request) -> Resources:
    resources: Resources = request.app.state.resources
    return resources


ResourcesDep = Annotated[Resources, Depends(get_resources)]


def get_session(resources: ResourcesDep) -> Iterator[Session]:
    session = resources.sessions()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


# scope="function" commits before the response is sent. FastAPI's default ("request") runs the code after `yield`
# once the client already has its 2xx: a failed commit went unseen, and the client's next request could miss the change.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]


def get_principal(
    resources: ResourcesDep, session: SessionDep, authorization: Annotated[str | None, Header()] = None
) -> Principal:
    token = bearer_token(authorization)
    admin_token = resources.settings.admin_token.get_secret_value()
    principal = find_principal(session, token=token, admin_token=admin_token)
    if principal is None:
        raise InvalidKey()
    return principal


PrincipalDep = Annotated[Principal, Depends(get_principal)]


def require_platform_admin(principal: PrincipalDep) -> Principal:
    if not principal.is_platform_admin:
        raise Forbidden("this needs the admin token")
    return principal


PlatformAdmin = Annotated[Principal, Depends(require_platform_admin)]


@dataclass(frozen=True)
class OrgAccess:
    """A request allowed to act on one org: its id and the caller."""

    org_id: str
    principal: Principal


def org_access(minimum_role: str) -> Callable[[str, Principal, Session], OrgAccess]:
    """A dependency admitting callers of the org (or the admin token) holding at least `minimum_role`.

    Another org's key gets the same 404 as a missing org, so ids of other orgs cannot be probed.
    """
    rank = ROLES.index(minimum_role)

    def check(org: str, principal: PrincipalDep, session: SessionDep) -> OrgAccess:
        if not principal.is_platform_admin and principal.org_id != org:
            raise NotFound(f"organization {org!r} not found")
        if session.get(Organization, org) is None:
            raise NotFound(f"organization {org!r} not found")
        if ROLES.index(principal.role) > rank:
            raise Forbidden(f"this needs an org key with role {minimum_role!r} or higher, not {principal.role!r}")
        return OrgAccess(org_id=org, principal=principal)

    return check


def platform_admin_of_org(org: str, principal: PrincipalDep, session: SessionDep) -> str:
    """Operators only; an org key learns no more about another org than a 404."""
    if not principal.is_platform_admin:
        if principal.org_id != org:
            raise NotFound(f"organization {org!r} not found")
        raise Forbidden("this needs the admin token")
    if session.get(Organization, org) is None:
        raise NotFound(f"organization {org!r} not found")
    return org


OrgOperator = Annotated[str, Depends(platform_admin_of_org)]
OrgViewer = Annotated[OrgAccess, Depends(org_access("viewer"))]
OrgTrainer = Annotated[OrgAccess, Depends(org_access("trainer"))]
OrgAdmin = Annotated[OrgAccess, Depends(org_access("admin"))]
