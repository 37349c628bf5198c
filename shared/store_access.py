"""Which databases an org may name as its training data source or its sync store.

An org's SQLite files live in a folder of its own, `<KILN_LOCAL_STORES_DIR>/<org>/`: an org admin names no other
file on the machine a worker runs on (another org's store, Kiln's own database, the worker's secrets). A database
that holds Kiln's own tables is never a sync store; as a data source it offers only the org's own synced tables.
These rules are checked by the worker that opens the database, on its own filesystem, not by the api.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Connection, inspect, select
from sqlalchemy.engine import URL, make_url
from sqlalchemy.engine.url import _parse_url
from sqlalchemy.orm import Session

from shared.db.models import ApiKey, Organization, SyncSource, TrainingRun
from shared.db.session import DATABASE_TIMEOUT_S
from shared.errors import InvalidInput, TransientError
from shared.schemas import holds_nul
from shared.settings import Settings
from shared.sync_tables import central_table_name

KILN_TABLES = frozenset({Organization.__tablename__, ApiKey.__tablename__, TrainingRun.__tablename__})
# The libpq parameters a store's URL may carry. The others name a secret (password, sslpassword: the URL's query is
# stored and shown as it is, only its user part's password is sealed) or a file of the machine that opens the
# store (sslkey, passfile, service: another org's key, the worker's own files).
POSTGRESQL_PARAMETERS = frozenset(
    {
        "application_name",
        "channel_binding",
        "client_encoding",
        "connect_timeout",
        "gssencmode",
        "keepalives",
        "keepalives_count",
        "keepalives_idle",
        "keepalives_interval",
        "sslmode",
        "target_session_attrs",
        "tcp_user_timeout",
    }
)


# libpq's own choices for the parameters that take a word, and those that take a whole number (a C int). Refused
# here, a bad value is a 422 naming the URL; libpq refused it only as a run or a job connected, which was retried as
# a server out of reach.
PARAMETER_CHOICES = {
    "channel_binding": ("disable", "prefer", "require"),
    "gssencmode": ("disable", "prefer", "require"),
    "sslmode": ("disable", "allow", "prefer", "require", "verify-ca", "verify-full"),
    "target_session_attrs": ("any", "read-write", "read-only", "primary", "standby", "prefer-standby"),
}
WHOLE_NUMBER_PARAMETERS = frozenset(
    {"connect_timeout", "keepalives", "keepalives_count", "keepalives_idle", "keepalives_interval", "tcp_user_timeout"}
)
_LARGEST_C_INT = 2**31 - 1
_C_INT = re.compile(r"[ \t\n\v\f\r]*([+-]?[0-9]+)[ \t\n\v\f\r]*")


def refuse_unsafe_parameters(url: URL, *, field: str) -> None:
    """A SQLite URL takes no query (the driver would open another file, named with it); a PostgreSQL URL only the
    parameters above, each with a value libpq takes."""
    names = sorted(url.query)
    if not names:
        return
    if url.get_backend_name() == "sqlite":
        raise InvalidInput(f"{field}: a SQLite store's URL takes no query parameters ({', '.join(names)})", field=field)
    if "password" in names:
        raise InvalidInput(
            f"{field}: give the password in the URL's user part (postgresql+psycopg2://user:password@host/db), where "
            "it is stored encrypted, not as a query parameter",
            field=field,
        )
    refused = [name for name in names if name not in POSTGRESQL_PARAMETERS]
    if refused:
        raise InvalidInput(
            f"{field}: the query parameters {', '.join(refused)} are not accepted; a store's URL may set "
            f"{', '.join(sorted(POSTGRESQL_PARAMETERS))}",
            field=field,
        )
    for name in names:
        _refuse_bad_value(name, url.query[name], field=field)


def _refuse_bad_value(name: str, given: str | tuple[str, ...], *, field: str) -> None:
    values = (given,) if isinstance(given, str) else given
    if len(values) > 1:
        raise InvalidInput(f"{field}: the query parameter {name} is given {len(values)} times", field=field)
    value = values[0]
    if name in PARAMETER_CHOICES and value not in PARAMETER_CHOICES[name]:
        choices = ", ".join(PARAMETER_CHOICES[name])
        raise InvalidInput(f"{field}: {name} must be one of {choices}, not {value[:40]!r}", field=field)
    if name in WHOLE_NUMBER_PARAMETERS and not _a_c_int(value):
        raise InvalidInput(f"{field}: {name} must be a whole number (a C int, as libpq reads it)", field=field)


def _a_c_int(value: str) -> bool:
    """As libpq's parse_int_param reads it: strtol (spaces before, a sign), then only spaces, and an int's range."""
    match = _C_INT.fullmatch(value)
    return match is not None and -_LARGEST_C_INT - 1 <= int(match.group(1)) <= _LARGEST_C_INT


# The most a label of a host name holds (RFC 1035).
DNS_LABEL_BYTES = 63


def refuse_malformed_host(url: URL, *, field: str) -> None:
    """A host name no resolver can be asked for: an empty label (`a..b`), or one over DNS's 63 bytes."""
    labels = (url.host or "").removesuffix(".").split(".") if url.host and ":" not in url.host else []
    if any(not label or len(label.encode()) > DNS_LABEL_BYTES for label in labels):
        raise InvalidInput(
            f"{field}: {url.host!r} is not a host name (each dot-separated label 1 to 63 bytes)", field=field
        )


def refuse_dropped_query(given: str, url: URL, *, field: str) -> None:
    """SQLAlchemy drops a query parameter without a value, silently: a SQLite file named `a?b.db` would be `a`,
    and `?sslmode` would set nothing. Both are refused instead (a `?` in a file's name is written %3F)."""
    if url.get_backend_name() == "sqlite":
        if "?" in given:
            raise InvalidInput(
                f"{field}: a SQLite store's URL takes no query parameters; write a ? in the file's name as %3F",
                field=field,
            )
        return
    # SQLAlchemy's own reading of the URL, keeping what make_url drops: the same grammar finds the same query.
    parsed = _parse_url(given, keep_blank_values=True)
    blank = [name for name, value in parsed.query.items() if "" in ((value,) if isinstance(value, str) else value)]
    if blank:
        raise InvalidInput(f"{field}: the query parameters {', '.join(blank)} have no value", field=field)


def refuse_nul(url: URL, *, field: str) -> None:
    """%00 decodes to a NUL, which no file path, libpq parameter or PostgreSQL text may hold."""
    if holds_nul([url.username, str(url.password or ""), url.host, url.database, dict(url.query)]):
        raise InvalidInput(f"{field}: no part of a database URL may hold a NUL (%00)", field=field)


# What a PostgreSQL URL without a port reaches; and the host of a server on the machine that opens the store.
POSTGRESQL_PORT = 5432
THIS_MACHINE = "localhost"


def store_identity(url: URL) -> tuple[str, ...]:
    """What two URLs of one store have in common, however they are spelled: they name the same store when these are
    equal. A SQLite file: its real path, links followed (as far as this machine sees it), whatever the driver. A
    PostgreSQL database: its server (host name lowercased; an address however written, `127.1` or
    `::ffff:127.0.0.1`; localhost, a loopback or unspecified address or a socket of this machine are all this
    machine; the port, 5432 when none is given) and its name (the user's, as libpq takes it, when none
    is given); neither the driver, nor the user, nor the parameters. Other host names are compared as written, not
    resolved: two names of one server are two stores here."""
    if url.get_backend_name() == "sqlite":
        return ("sqlite", os.path.realpath(url.database or ""))
    return (
        url.get_backend_name(),
        _server_host(url.host),
        str(url.port or POSTGRESQL_PORT),
        url.database or url.username or "",
    )


# A host libpq reads as an IPv4 address although it is not dotted-quad: inet_aton's shorter forms (`127.1`,
# `2130706433`, `0x7f.1`, `0177.0.0.1`), which getaddrinfo takes as numbers, never as names to look up.
_INET_ATON_FORM = re.compile(r"[0-9a-fx.]+")


def _server_host(host: str | None) -> str:
    """The server's host as one spelling: an address as its shortest text, an IPv4 address written as IPv6
    (`::ffff:127.0.0.1`) as IPv4, and this machine's (a loopback address; the unspecified `0.0.0.0` and `::`, which
    a connection takes to this machine) as THIS_MACHINE. A name is lowercased, its trailing dot dropped."""
    name = (host or THIS_MACHINE).lower().rstrip(".")
    address = _address(name)
    if address is None:
        return name
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return THIS_MACHINE if address.is_loopback or address.is_unspecified else str(address)


def _address(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        pass
    if not _INET_ATON_FORM.fullmatch(name):
        return None
    try:
        return ipaddress.IPv4Address(socket.inet_aton(name))
    except OSError:
        return None


@dataclass(frozen=True)
class StoreRules:
    """What one org's worker may open. `kiln_tables` are the tables of Kiln's own database it may read."""

    org_id: str
    stores_dir: Path
    kiln_database_url: str
    kiln_tables: frozenset[str] = frozenset()
    # KILN_STORE_NETWORKS: where a database server may be; empty, anywhere.
    networks: tuple[str, ...] = ()
    # KILN_DATABASE_TIMEOUT_S: how long the worker waits on a database server of the org's that stops answering.
    timeout_s: float = DATABASE_TIMEOUT_S

    @classmethod
    def for_sync(cls, settings: Settings, org_id: str) -> StoreRules:
        """A sync store: a file in the org's folder or a server of its own, never Kiln's database."""
        return cls(
            org_id,
            settings.resolved_local_stores_dir,
            settings.resolved_database_url,
            networks=settings.store_network_entries,
            timeout_s=settings.database_timeout_s,
        )

    @classmethod
    def for_training(cls, session: Session, settings: Settings, org_id: str) -> StoreRules:
        """A data source: as a sync store, or Kiln's own database for the org's own synced tables."""
        synced = synced_tables_of(session, org_id)
        return cls(
            org_id,
            settings.resolved_local_stores_dir,
            settings.resolved_database_url,
            synced,
            networks=settings.store_network_entries,
            timeout_s=settings.database_timeout_s,
        )

    @property
    def org_folder(self) -> Path:
        return (self.stores_dir / self.org_id).resolve()

    def check_before_opening(self, url: URL, *, field: str) -> URL:
        """The URL to open. A SQLite store must be an existing file in the org's folder (after links are followed):
        opening a missing one would create it. A server must be on one of `networks`, when they are set. Either
        kind: no query parameter that names a secret or a file."""
        refuse_unsafe_parameters(url, field=field)
        if url.get_backend_name() != "sqlite":
            return self._on_allowed_network(url, field=field)
        if self._is_kiln_database_file(url):
            return url
        path = Path(url.database or "").resolve()
        if not path.is_relative_to(self.org_folder):
            raise InvalidInput(
                f"the SQLite file {url.database} is not in {self.org_folder}/, where organization {self.org_id}'s "
                "SQLite files must be (KILN_LOCAL_STORES_DIR)",
                field=field,
            )
        if not path.is_file():
            raise InvalidInput(f"the SQLite file {path} does not exist", field=field)
        return url

    def _on_allowed_network(self, url: URL, *, field: str) -> URL:
        """A server named by a listed host name as it is; any other by the address it resolves to now, pinned
        (libpq's hostaddr) so that the connection goes where the check looked, whatever DNS answers next."""
        if not self.networks or (url.host or "").lower() in self.networks:
            return url
        networks = [ipaddress.ip_network(entry) for entry in self.networks if "/" in entry]
        addresses = _addresses(url, field=field)
        if not addresses or not all(any(address in network for network in networks) for address in addresses):
            raise InvalidInput(
                f"{field}: the database server {url.host or '(this machine, by socket)'} is not on the networks "
                "organizations' databases may be on (KILN_STORE_NETWORKS)",
                field=field,
            )
        return url.update_query_dict({"hostaddr": str(addresses[0])})

    def check_opened(self, connection: Connection, *, table: str | None, field: str, schema: str | None = None) -> None:
        """Kiln's own database, reached by any URL, gives up only the tables in `kiln_tables`, named without a schema.
        It is known by Kiln's tables in the connection's default schema, or in the `schema` a table is read from:
        a user whose search_path leads elsewhere would not see them in the default one."""
        inspector = inspect(connection)
        if not any(set(inspector.get_table_names(schema=where)) >= KILN_TABLES for where in {None, schema}):
            return
        if table is None or schema is not None or table not in self.kiln_tables:
            raise InvalidInput(
                "the database is Kiln's own: an organization may read only its own synced tables there "
                "(sync_<sourceId>_<table>), and may not sync with it",
                field=field,
            )

    def _is_kiln_database_file(self, url: URL) -> bool:
        kiln = make_url(self.kiln_database_url)
        if kiln.get_backend_name() != "sqlite" or not kiln.database or not url.database:
            return False
        return Path(url.database).resolve() == Path(kiln.database).resolve()


def _addresses(url: URL, *, field: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """What the server's name resolves to; none for a server reached by a socket of this machine."""
    if not url.host:
        return []
    refuse_malformed_host(url, field=field)
    try:
        found = socket.getaddrinfo(url.host, url.port or 5432, proto=socket.IPPROTO_TCP)
    except socket.gaierror as error:
        raise TransientError(f"the database server {url.host} does not resolve: {error.strerror}") from None
    except UnicodeError:  # a name Python's IDNA codec refuses before any lookup
        raise InvalidInput(f"{field}: {url.host!r} is not a host name the resolver takes", field=field) from None
    return [ipaddress.ip_address(info[4][0]) for info in found]


def synced_tables_of(session: Session, org_id: str) -> frozenset[str]:
    """The central copies of the org's synced tables: what it may train on in Kiln's own database."""
    sources = session.scalars(select(SyncSource).where(SyncSource.org_id == org_id)).all()
    return frozenset(central_table_name(source.id, table["name"]) for source in sources for table in source.tables)
